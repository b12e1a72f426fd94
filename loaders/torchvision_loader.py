"""The reference backend: torchvision's ImageFolder, PIL decoding and transforms on CPU workers."""
from __future__ import annotations

import itertools
import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision import transforms as T
from torchvision.transforms import v2

from loaders import TORCHVISION_PREFETCH_FACTOR, shard, subset_indices
from loaders.device_decode import CropDraw, DeviceDecode, fill_failed, read_encoded
from loaders.device_stage import device_stages
from loaders.spec import (BLUR_P, BLUR_SIGMA, COLOUR_STRENGTH, DataConfig, LoaderError, LoaderRequest, blur_kernel,
                          image_folder, load_rgb, load_rgb_tensor, output_dtype, require_path, split_classes, to_device)

log = logging.getLogger(__name__)


def build_transform(cfg: DataConfig, augment: str, host_colour: bool = True) -> T.Compose:
    """The official SupCon/SelfCon augmentations (contrastive), SimCLR's (stronger colour and a blur),
    plain crop+flip (basic), or center crop, on PIL images. ``host_colour`` False: the crops only, on
    and to uint8 tensors (``load_rgb_tensor``'s; the device stage adds the colour and the normalisation)."""
    size = cfg.image_size
    if not host_colour:
        return crop_transform(cfg, augment)
    tail = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if augment == "center":
        return T.Compose([T.Resize(int(round(size / cfg.val_resize_ratio))), T.CenterCrop(size), *tail])
    if augment == "padcrop_cutout":  # the official CDS CIFAR view read by the classifier
        return T.Compose([T.RandomCrop(size, padding=4, fill=128), T.RandomHorizontalFlip(), T.ToTensor(),
                          Cutout(size // 2), T.Normalize(cfg.mean, cfg.std)])
    if augment == "padcrop_contrastive":  # the official CDS CIFAR contrastive view
        return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(*COLOUR_STRENGTH["contrastive"])], p=0.8),
                          T.RandomGrayscale(p=0.2), *tail])
    crop = [T.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio), T.RandomHorizontalFlip()]
    if augment == "basic":
        return T.Compose([*crop, *tail])
    color = [T.RandomApply([T.ColorJitter(*COLOUR_STRENGTH[augment])], p=0.8), T.RandomGrayscale(p=0.2)]
    if augment == "simclr":
        color.append(T.RandomApply([T.GaussianBlur(blur_kernel(size), BLUR_SIGMA)], p=BLUR_P))
    return T.Compose([*crop, *color, *tail])


def crop_transform(cfg: DataConfig, augment: str) -> v2.Compose:
    """The host stage when the colour runs on the device: torchvision's RandomResizedCrop and flip
    (centre crop for evaluation) on a uint8 tensor, antialiased as PIL's resize: the decode + crop
    ceiling's own operations (benchmarks/decode_ceiling.py)."""
    size = cfg.image_size
    if augment == "center":
        return v2.Compose([v2.Resize(int(round(size / cfg.val_resize_ratio)), antialias=True), v2.CenterCrop(size)])
    return v2.Compose([v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
                       v2.RandomHorizontalFlip()])


class Cutout:
    """DeVries & Taylor's Cutout as the official CDS code applies it (after ToTensor, before Normalize):
    a ``length`` square centred anywhere in the image, clipped at its borders, set to 0. Written here
    because torchvision's RandomErasing keeps its box inside the image and draws its size."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        y, x = int(torch.randint(height, ())), int(torch.randint(width, ()))
        half = self.length // 2
        image = image.clone()
        image[..., max(0, y - half):min(height, y + half), max(0, x - half):min(width, x + half)] = 0
        return image


class TolerantImageFolder(Dataset):
    """ImageFolder whose unreadable files are reported with each item, never raised in a worker.

    A training read (``replace``) replaces an unreadable file by the next readable one: every batch
    keeps its size, which the cross-process gather of the contrastive loss needs. An evaluation
    read drops it (its item is ``None``): every readable image counts once, and no image twice.
    """

    def __init__(self, folder, transforms, replace: bool, load=None):
        self.folder = folder  # spec.image_folder
        self.transforms, self.replace = transforms, replace  # one per view
        self.load = load  # path -> what the transforms take (default: load_rgb, looked up at each read)

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, index):
        skipped = []
        for attempt in range(len(self) if self.replace else 1):
            path, label = self.folder.samples[(index + attempt) % len(self)]
            try:
                image = (self.load or load_rgb)(path)
            except Exception as exc:  # PIL raises many types for a broken file
                skipped.append(f"{path} ({type(exc).__name__}: {exc})")
                continue
            return tuple(transform(image) for transform in self.transforms), label, skipped
        return None, None, skipped


def _collate(batch, encoded: bool = False):
    """The readable items' views and labels (``None`` if there is none), and what was skipped. Views
    are stacked per view; ``encoded`` (device decoding): the items are (EncodedImage, box per view...),
    collated as (the EncodedImages, boxes ``[V, B, 7]``)."""
    readable = [(views, label) for views, label, _ in batch if views is not None]
    skipped = [entry for _, _, item in batch for entry in item]
    if not readable:
        return None, None, skipped
    views, labels = zip(*readable)
    per_view = list(zip(*views))
    # default_collate stacks into shared memory in a worker: the batch crosses to the main process uncopied
    stacked = ([*per_view[0]], torch.stack([torch.stack(v) for v in per_view[1:]])) if encoded else \
        tuple(default_collate(list(v)) for v in per_view)
    return stacked, torch.tensor(labels, dtype=torch.long), skipped


def _collate_encoded(batch):
    return _collate(batch, encoded=True)


class _SkippingSampler(DistributedSampler):
    """The epoch's order, less its first ``skip`` samples (a resumed epoch), none of them read. With
    ``num_workers: 0`` the augmentations draw from the main process's RNG, which a resumed run restores,
    so the rest of the epoch is the uninterrupted run's, image for image and crop for crop."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


class TorchvisionLoader:
    def __init__(self, cfg: DataConfig, req: LoaderRequest):
        key = f"data.{req.split}"
        root = require_path(getattr(cfg, req.split), key)
        folder = image_folder(root, key, split_classes(cfg, req.split))
        self.stages = device_stages(cfg, req, req.augments)  # per view, or None: the workers colour and normalise
        if cfg.decode == "device":  # the workers read bytes and draw crops; the device decodes
            self.decoder = DeviceDecode(cfg.image_size, req.device)
            draws = [CropDraw(cfg.for_view(v, req.num_views), a) for v, a in enumerate(req.augments)]
            dataset = TolerantImageFolder(folder, [_encoded, *draws], req.training, load=read_encoded)
        else:
            self.decoder = None
            transforms = [build_transform(cfg.for_view(v, req.num_views), a, self.stages is None)
                          for v, a in enumerate(req.augments)]
            dataset = TolerantImageFolder(folder, transforms, req.training,
                                          load=None if self.stages is None else load_rgb_tensor)
        self.req, self.dtype, self.root = req, output_dtype(cfg), root
        self.num_classes = len(dataset.folder.classes)
        self.classes = dataset.folder.classes
        self.skipped: set[str] = set()
        items = subset_indices(len(dataset), req.subset, req.seed).tolist()
        self.generator = torch.Generator().manual_seed(req.seed)  # workers' seeds: never the global RNG's draws
        if req.training:
            source = Subset(dataset, items) if req.subset else dataset
            self.sampler = _SkippingSampler(source, num_replicas=req.world_size, rank=req.rank,
                                            shuffle=True, seed=req.seed, drop_last=True)
            sampler = self.sampler
        else:
            self.sampler = None
            source, sampler = Subset(dataset, [items[i] for i in shard(len(items), req.rank, req.world_size)]), None
        if req.training and len(self.sampler) < req.batch_size:
            raise LoaderError(f"{key}: {len(self.sampler)} images per process, fewer than one batch "
                              f"of {req.batch_size}")
        self.loader = DataLoader(
            source, batch_size=req.batch_size, sampler=sampler, shuffle=False, drop_last=req.training,
            num_workers=cfg.num_workers, collate_fn=_collate_encoded if self.decoder else _collate,
            pin_memory=req.device.type == "cuda",
            generator=self.generator,
            # evaluation reads (k-NN every epoch, a linear evaluation's cached features) start their workers
            # per pass: none sit idle between passes
            persistent_workers=cfg.num_workers > 0 and req.training,
            prefetch_factor=TORCHVISION_PREFETCH_FACTOR if cfg.num_workers > 0 else None)
        self.num_samples = len(self.loader) * req.batch_size if req.training else len(source)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.generator.manual_seed(self.req.seed * 1_000_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.skip = skip_batches * self.req.batch_size

    def __iter__(self) -> Iterator:
        yielded = 0
        for views, labels, skipped in self.loader:
            for entry in skipped:
                path = entry.split(" (", 1)[0]
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipping unreadable image %s", entry)
            if views is None:
                if self.req.training:
                    raise LoaderError(f"data.{self.req.split}: no readable image in {self.root}")
                continue
            if self.decoder is not None:
                views, labels = self._decode(*views, labels)
                if views is None:
                    continue
            yielded += 1
            if self.stages is None:
                views = tuple(to_device(v, self.req, self.dtype) for v in views)
            else:  # uint8 crosses to the device, the colour and the normalisation run there
                views = tuple(to_device(stage(to_device(v, self.req, torch.uint8)), self.req, self.dtype)
                              for stage, v in zip(self.stages, views))
            yield views, labels.to(self.req.device, non_blocking=True)
        if not yielded and len(self.loader):
            raise LoaderError(f"data.{self.req.split}: no readable image in {self.root}")


    def _decode(self, images, boxes, labels):
        """uint8 crops on the device per view; a file whose bytes did not decode is skipped as an
        unreadable one (training: its place goes to another image of the batch)."""
        views, failed = self.decoder(images, boxes)
        for i in failed:
            if images[i].path not in self.skipped:
                self.skipped.add(images[i].path)
                log.warning("skipping unreadable image %s (its bytes do not decode)", images[i].path)
        if len(failed) == len(images):
            if self.req.training:  # every process must take the step: a batch skipped here alone would hang the others
                raise LoaderError(f"data.{self.req.split}: no image of a batch decodes ({images[0].path}, ...)")
            return None, None
        if self.req.training:
            return fill_failed(views, labels, failed)
        return views, labels[[i for i in range(len(images)) if i not in set(failed)]]


def _encoded(image):
    """The first item of a device-decoded sample: the file itself (EncodedImage), then each view's box."""
    return image


def build(cfg: DataConfig, req: LoaderRequest) -> TorchvisionLoader:
    return TorchvisionLoader(cfg, req)
