"""NVIDIA DALI backend: ImageFolder files -> decoded, augmented, normalised batches.

One pipeline definition serves both devices: on CUDA the JPEGs are decoded by nvJPEG
(``mixed``) and every later op runs on the GPU, so batches never visit the host; with
``data.dali.device: cpu`` the same graph runs on the CPU and DALI copies each finished batch to
the GPU; without a GPU (the tests) it runs on the CPU with ``device_id=None``. Threads and the
prefetch queue are ``data.dali.threads`` (default ``data.num_workers``) and ``data.dali.prefetch``.

Design choices (see docs/design.md, ``loaders/``):

* Labels. The file and label lists come from torchvision's ``ImageFolder`` scan and are passed
  to ``fn.readers.file(files=, labels=)``, so class indices are those of the torchvision
  backend by construction (DALI's own ``file_root`` walk also sorts folder names bytewise,
  but it filters extensions and empty folders differently).
* Corrupt files. DALI cannot skip a sample it fails to decode: the whole pipeline raises.
  So every file a request reads is checked once per process when its loader is built (PIL header
  parse + ``verify()``, a few KB read per file, on ``num_workers`` threads; a k-NN bank of 10,000
  images checks those 10,000, not the split); unreadable ones are excluded, named in one
  warning and recorded in ``skipped``. A file whose header is fine but whose entropy data
  is damaged is not caught; such a file would stop the run with DALI's error naming it.
* Sharding. ``shard_id``/``num_shards`` = rank/world size. Training keeps the first
  ``world_size * (N // world_size)`` files of a ``seed``-permuted list, so all shards are
  equal and DROP yields the same number of full batches on every rank (DALI's DROP logic
  misbehaves with unequal shards); at most ``world_size - 1`` files sit out, the same ones
  every epoch. ``shuffle_after_epoch`` reshuffles the whole list every epoch identically on
  all ranks, from ``shuffle_after_epoch_seed`` (the request's ``seed``) and DALI's own epoch
  counter, so ``set_epoch`` cannot steer it.
* Last batch. Training drops it. Evaluation uses contiguous shards whose sizes sum to the
  dataset size, ``pad_last_batch`` + ``reader_name`` + PARTIAL: the padded copies are cut
  off, every sample is counted exactly once across processes. DALI also tops smaller shards
  up with empty batches to the largest shard's count; those are skipped, so, as with the
  torchvision backend, ranks may differ by one evaluation batch.
* An epoch abandoned part-way (``break``) resumes where it stopped on the next ``iter()``:
  DALI iterators cannot be reset mid-epoch.
* Colour (``augment="contrastive"``, official SupCon: ColorJitter(0.4, 0.4, 0.4, 0.1) with
  p=0.8, RandomGrayscale p=0.2; ``"simclr"``: ColorJitter(0.8, 0.8, 0.8, 0.2) and a Gaussian
  blur, ``fn.gaussian_blur``, p=0.5) is one ``fn.color_twist`` per view: jitter factors are
  blended with identity by a coin flip, and grayscale is saturation 0 (luma = the same
  0.299/0.587/0.114 weights as torchvision). Differences from torchvision: a fixed op order
  (torchvision permutes the four ops), contrast pivots on mid-grey rather than the image's
  mean grey, hue is a rotation in YIQ space, and one clamp at the end.
* Two views: one read; ``data.dali.decode: once`` decodes each JPEG once and takes two
  independent ``random_resized_crop`` of it (solo-learn's layout), ``per_view`` runs two fused
  ``image_random_crop`` decodes of the same bytes (each decodes only its crop's region).
"""
from __future__ import annotations

import functools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from loaders import subset_indices
from loaders.spec import (BLUR_P, BLUR_SIGMA, COLOUR_STRENGTH, DataConfig, LoaderError, LoaderRequest, blur_kernel,
                          image_folder, output_dtype, require_path, split_classes, to_device)

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as exc:  # re-raised as ImportError so build_loader names the extra to install
    raise ImportError(f"nvidia-dali is not installed ({exc})") from exc

log = logging.getLogger(__name__)

READER = "reader"


def _unreadable(path: str) -> Optional[str]:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types for a broken file
        return f"{path} ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=8)
def _image_folder(root: str, key: str, classes: Optional[tuple[str, ...]]):
    """The split's (path, label) pairs and class names, scanned once per process (training, the k-NN
    bank and the linear evaluation read the same split)."""
    folder = image_folder(Path(root), key, classes)
    return tuple(folder.samples), tuple(folder.classes)


@functools.lru_cache(maxsize=65536)
def _unreadable_cached(path: str) -> Optional[str]:
    return _unreadable(path)


def scan(root: Path, key: str, threads: int, subset: Optional[int] = None, seed: int = 0,
         classes: Optional[Sequence[str]] = None) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """(readable (path, label) pairs, class names, unreadable file reports) of the files of an
    ImageFolder a request reads: all, or its ``subset`` (drawn as ``loaders.subset_indices`` draws it).
    Only those files are opened, and each only once per process."""
    all_samples, classes = _image_folder(str(root), key, None if classes is None else tuple(classes))
    chosen = [all_samples[i] for i in subset_indices(len(all_samples), subset, seed)]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound: threads overlap file opens
        reports = list(pool.map(_unreadable_cached, (p for p, _ in chosen), chunksize=256))
    samples = [s for s, bad in zip(chosen, reports) if bad is None]
    return samples, list(classes), [r for r in reports if r is not None]


def _colour(images, strength):
    """RandomApply(ColorJitter(*strength), p=.8) + RandomGrayscale(p=.2)."""
    jitter = fn.random.coin_flip(probability=0.8)
    keep_colour = 1 - fn.random.coin_flip(probability=0.2)
    brightness, contrast, saturation, hue = strength

    def factor(spread):
        return 1.0 + jitter * (fn.random.uniform(range=[1.0 - spread, 1.0 + spread]) - 1.0)

    return fn.color_twist(images, brightness=factor(brightness), contrast=factor(contrast),
                          saturation=factor(saturation) * keep_colour,
                          hue=jitter * fn.random.uniform(range=[-360.0 * hue, 360.0 * hue]))  # hue in turns


def _blur(images, window: int):
    """SimCLR's RandomApply(GaussianBlur(window, sigma 0.1-2), p=.5) without conditionals: a skipped
    blur gets sigma 0.01, whose neighbour weights (e^-5000) leave every pixel as it was."""
    blurred = fn.random.coin_flip(probability=BLUR_P)
    sigma = blurred * fn.random.uniform(range=list(BLUR_SIGMA)) + (1 - blurred) * 0.01
    return fn.gaussian_blur(images, window_size=window, sigma=sigma)


def placement(cfg: DataConfig, device: torch.device) -> tuple[str, bool]:
    """(DALI's decoder device, whether DALI copies the finished batch to the GPU): nvJPEG (``mixed``,
    every later op on the GPU) when training on a GPU unless ``data.dali.device: cpu``, which decodes
    and augments with the same ops on the CPU and hands over the batch on the GPU."""
    if device.type != "cuda":
        return "cpu", False
    return ("mixed", False) if cfg.dali.device == "gpu" else ("cpu", True)


@pipeline_def(enable_conditionals=False)
def _pipeline(files, labels, root, cfg, req, decode_device, outputs_to_gpu):
    training = req.training
    jpegs, label = fn.readers.file(
        file_root=str(root), files=files, labels=labels, name=READER,
        shard_id=req.rank, num_shards=req.world_size, pad_last_batch=True,
        shuffle_after_epoch=training, stick_to_shard=not training,
        **({"shuffle_after_epoch_seed": req.seed % 2**31} if training else {}))
    # nvJPEG's buffers: DALI's own defaults, grown on demand. NVIDIA's older ImageNet example padded them
    # to ImageNet's largest image (211 MB GPU + 140 MB pinned host per decoder thread and op: GBs per
    # process with two views), to avoid a few reallocations early in the first epoch.
    decoder_args = dict(device=decode_device, output_type=types.RGB)
    size = cfg.image_size
    dtype = types.FLOAT if output_dtype(cfg) != torch.float16 else types.FLOAT16
    # HWC output viewed as NCHW is channels_last memory at no cost; CHW is the plain layout.
    normalise = dict(dtype=dtype, output_layout="HWC" if req.channels_last else "CHW",
                     mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std])
    views = []
    if req.augment == "center":
        images = fn.decoders.image(jpegs, **decoder_args)
        images = fn.resize(images, resize_shorter=int(round(size / cfg.val_resize_ratio)))
        views.append(fn.crop_mirror_normalize(images, crop=(size, size), **normalise))
    else:
        decoded = None
        if len(req.augments) > 1 and cfg.dali.decode == "once":
            decoded = fn.decoders.image(jpegs, **decoder_args)
        for v, augment in enumerate(req.augments):
            crop = dict(random_area=list(cfg.for_view(v, len(req.augments)).crop_scale),
                        random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10)
            if decoded is not None:
                images = fn.random_resized_crop(decoded, size=(size, size), **crop)
            else:
                images = fn.resize(fn.decoders.image_random_crop(jpegs, **crop, **decoder_args), size=(size, size))
            if augment in COLOUR_STRENGTH:
                images = _colour(images, COLOUR_STRENGTH[augment])
            if augment == "simclr" and blur_kernel(size) > 1:
                images = _blur(images, blur_kernel(size))
            views.append(fn.crop_mirror_normalize(
                images, mirror=fn.random.coin_flip(probability=0.5), **normalise))
    if outputs_to_gpu:  # decoded and augmented on the CPU; DALI copies the batch to the GPU
        views = [v.gpu() for v in views]
    return (*views, label.gpu() if decode_device == "mixed" or outputs_to_gpu else label)


class DALILoader:
    def __init__(self, cfg: DataConfig, req: LoaderRequest):
        key = f"data.{req.split}"
        root = require_path(getattr(cfg, req.split), key)
        samples, self.classes, bad = scan(root, key, cfg.num_workers, req.subset, req.seed,
                                          split_classes(cfg, req.split))
        self.num_classes = len(self.classes)
        self.skipped: set[str] = {entry.split(" (", 1)[0] for entry in bad}
        if bad:
            log.warning("%s: skipping %d unreadable image(s): %s", key, len(bad), "; ".join(bad))
        world, rank, batch = req.world_size, req.rank, req.batch_size
        if req.training:
            order = np.random.default_rng(req.seed).permutation(len(samples))
            samples = [samples[i] for i in order[: world * (len(samples) // world)]]
            shard_size = len(samples) // world
            if shard_size < batch:
                raise LoaderError(f"{key}: {shard_size} images per process, fewer than one batch of {batch}")
            self.steps = shard_size // batch
            self.num_samples = self.steps * batch
        else:
            # DALI's shard bounds: floor(n * i / world); the sizes sum to n.
            n = len(samples)
            self.num_samples = n * (rank + 1) // world - n * rank // world
            if self.num_samples == 0:
                raise LoaderError(f"{key}: {n} images for {world} processes; process {rank} gets none")
            self.steps = math.ceil(self.num_samples / batch)
        self.files = [str(Path(p).relative_to(root)) for p, _ in samples]
        self.labels = [label for _, label in samples]
        self.req, self.dtype = req, output_dtype(cfg)
        device_id = None  # what DALI needs to run without a driver
        if req.device.type == "cuda":
            device_id = req.device.index if req.device.index is not None else torch.cuda.current_device()
        self.decode_device, outputs_to_gpu = placement(cfg, req.device)
        pipe = _pipeline(
            self.files, self.labels, root, cfg, req, self.decode_device, outputs_to_gpu,
            batch_size=batch, num_threads=cfg.dali.threads or max(1, cfg.num_workers), device_id=device_id,
            prefetch_queue_depth=cfg.dali.prefetch,
            seed=(req.seed * 65537 + rank) % 2**31)  # augmentations differ between ranks
        pipe.build()
        center = req.augment == "center"
        self.views = [f"view{i}" for i in range(1 if center else req.num_views)]
        self.repeat = req.num_views if center else 1  # a deterministic view is the same image twice
        self.skip_batches = 0
        self.iterator = DALIGenericIterator(
            pipe, [*self.views, "label"], reader_name=READER, auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if req.training else LastBatchPolicy.PARTIAL)
        # guards the size arithmetic above; in evaluation DALI pads every rank to the largest
        # shard's batch count with empty batches, which __iter__ skips
        if len(self.iterator) != self.steps if req.training else len(self.iterator) < self.steps:
            raise LoaderError(f"{key}: DALI plans {len(self.iterator)} batches, expected {self.steps}")

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """DALI reshuffles itself each epoch (see the module docstring): a resumed epoch drops its first
        ``skip_batches`` batches, so it has the right length, but not the interrupted epoch's samples."""
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        for index, (batch,) in enumerate(self.iterator):
            if len(batch["label"]) == 0 or index < self.skip_batches:
                continue
            views = []
            for name in self.views:
                x = batch[name]
                views.append(to_device(x.permute(0, 3, 1, 2) if self.req.channels_last else x,
                                       self.req, self.dtype))
            yield tuple(views) * self.repeat, batch["label"].view(-1).to(self.req.device, torch.long)


def build(cfg: DataConfig, req: LoaderRequest) -> DALILoader:
    return DALILoader(cfg, req)
