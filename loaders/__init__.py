"""Loader backends, one file each: files on disk -> ``(views, labels)`` on the training device.

    loader = build_loader("torchvision", data_cfg, LoaderRequest(split="train", batch_size=256,
                          augment="contrastive", num_views=2, device=device))
    for views, labels in loader: ...
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from loaders.spec import DataConfig, Loader, LoaderError, LoaderRequest, require_path

# batches a backend decodes ahead of the step: torchvision per worker, ffcv's batches_ahead (DALI's
# queue is data.dali.prefetch)
TORCHVISION_PREFETCH_FACTOR, FFCV_BATCHES_AHEAD = 4, 3
_ALL_AUGMENTS = frozenset({"contrastive", "simclr", "basic", "center", "padcrop_cutout", "padcrop_contrastive"})


@dataclass(frozen=True)
class Backend:
    """A loader backend, registered once with what it can do; the recipe refuses the rest at load time."""
    module: str  # has ``build(cfg, req) -> Loader``; imported on use, so ffcv and dali cost nothing uninstalled
    source: Optional[str]  # what a split's path is: an image folder ("dir"), a .beton ("file"), nothing
    augments: frozenset  # the augmentations it makes
    progressive: bool = False  # data.progressive (ffcv-imagenet's resolution ramp)
    device_decode: frozenset = frozenset()  # the augmentations it makes from JPEGs decoded on the device
    extra: str = ""  # the pip extra that installs it
    prefetch: Callable[[DataConfig], int] = lambda cfg: 0  # batches it decodes ahead of the step


BACKENDS = {
    "torchvision": Backend("loaders.torchvision_loader", "dir", _ALL_AUGMENTS,
                           device_decode=frozenset({"contrastive", "simclr", "basic", "center"}),
                           prefetch=lambda cfg: cfg.num_workers * TORCHVISION_PREFETCH_FACTOR),
    "ffcv": Backend("loaders.ffcv_loader", "file", frozenset({"contrastive", "basic", "center"}), progressive=True,
                    extra="ffcv", prefetch=lambda cfg: FFCV_BATCHES_AHEAD),
    "dali": Backend("loaders.dali_loader", "dir", frozenset({"contrastive", "simclr", "basic", "center"}),
                    extra="dali", prefetch=lambda cfg: cfg.dali.prefetch),
    "synthetic": Backend("loaders.synthetic", None, _ALL_AUGMENTS),
}


def build_loader(backend: str, cfg: DataConfig, req: LoaderRequest) -> Loader:
    if backend not in BACKENDS:
        raise LoaderError(f"loader={backend!r}: unknown backend (choose from {', '.join(BACKENDS)})")
    try:
        module = importlib.import_module(BACKENDS[backend].module)
    except ImportError as exc:  # the optional dependency itself is missing
        raise LoaderError(f"loader={backend}: {exc} (install it with: pip install -e '.[{backend}]')") from exc
    return module.build(cfg, req)


def unsupported(backend: str, cfg: DataConfig, augments, key: str) -> Optional[str]:
    """Why ``backend`` cannot make what a recipe asks for (one line naming ``key``, where ``augments``
    come from), or None."""
    spec = BACKENDS[backend]
    missing = sorted(set(augments) - spec.augments)
    if missing:
        return (f"{key}: loader={backend} does not make the {', '.join(missing)} augmentation (the torchvision "
                f"loader makes every one)")
    if cfg.progressive and not spec.progressive:
        return f"data.progressive: read only by loader=ffcv; loader={backend} would train at data.image_size"
    if cfg.decode == "device":
        if not spec.device_decode:
            return ("data.decode=device: read only by loader=torchvision (loader=dali decodes on the GPU with "
                    "data.dali.device: gpu; ffcv decodes in its threads)")
        if cfg.colour_stage == "host":
            return "data.decode=device: the colour then runs on the device; data.colour_stage=host cannot apply"
        host_only = sorted(set(augments) - spec.device_decode)
        if host_only:
            return f"{key}: data.decode=device does not make the {', '.join(host_only)} augmentation (decode=host does)"
    return None


def prefetch_batches(backend: str, cfg: DataConfig) -> int:
    """How many batches the backend can hold ready before training asks: a throughput measured over
    fewer steps than this (after start-up) measures start-up decoding, not the loader's rate."""
    return BACKENDS[backend].prefetch(cfg) if backend in BACKENDS else 0


def check_split(backend: str, cfg: DataConfig, split: str) -> None:
    """The split's path is there and of the kind the backend reads, or a LoaderError naming its key."""
    if BACKENDS[backend].source:
        require_path(getattr(cfg, split), f"data.{split}", kind=BACKENDS[backend].source)


def shard(num_items: int, rank: int, world_size: int) -> range:
    """The items one process evaluates: every item exactly once across processes, no padding."""
    return range(rank, num_items, world_size)


def subset_indices(num_items: int, subset: Optional[int], seed: int) -> np.ndarray:
    """The items of a split a request reads: all of them, or ``subset`` of them drawn with ``seed``
    (the same on every process and every epoch), in file order."""
    if subset is None or subset >= num_items:
        return np.arange(num_items)
    return np.sort(np.random.default_rng(seed).choice(num_items, size=subset, replace=False))


__all__ = ["BACKENDS", "Backend", "DataConfig", "Loader", "LoaderError", "LoaderRequest", "build_loader",
           "check_split", "prefetch_batches", "shard", "subset_indices", "unsupported"]
