"""Random images made on the device: no decoding, no host->device copy (the trainer's upper bound)."""
from __future__ import annotations

import torch

from loaders.spec import DataConfig, LoaderRequest, output_dtype


class SyntheticLoader:
    def __init__(self, cfg: DataConfig, req: LoaderRequest):
        self.req, self.dtype = req, output_dtype(cfg)
        self.num_classes = cfg.num_classes or 10
        per_process = cfg.synthetic_samples // req.world_size
        self.batches = per_process // req.batch_size if req.training else -(-per_process // req.batch_size)
        self.batches = max(1, self.batches)
        self.num_samples = self.batches * req.batch_size
        self.skipped: set[str] = set()
        self.size = cfg.image_size
        self.epoch = self.skip_batches = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        gen = torch.Generator(device=self.req.device)
        gen.manual_seed(self.req.seed * 1_000_003 + self.epoch * 1009 + self.req.rank)
        fmt = torch.channels_last if self.req.channels_last else torch.contiguous_format
        shape = (self.req.batch_size, 3, self.size, self.size)
        for index in range(self.batches):
            labels = torch.randint(0, self.num_classes, (self.req.batch_size,), device=self.req.device, generator=gen)
            views = tuple(torch.randn(shape, device=self.req.device, generator=gen, dtype=torch.float32)
                          .to(dtype=self.dtype, memory_format=fmt) for _ in range(self.req.num_views))
            if index >= self.skip_batches:  # made and dropped: the generator stays where an unbroken epoch has it
                yield views, labels


def build(cfg: DataConfig, req: LoaderRequest) -> SyntheticLoader:
    return SyntheticLoader(cfg, req)
