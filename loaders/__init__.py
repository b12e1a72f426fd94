"""Loader backends, one file each: files on disk -> ``(views, labels)`` on the training device.

    loader = build_loader("torchvision", data_cfg, LoaderRequest(split="train", batch_size=256,
                          augment="contrastive", num_views=2, device=device))
    for views, labels in loader: ...
"""
from __future__ import annotations

import importlib
from typing import Optional

import numpy as np

from loaders.spec import DataConfig, Loader, LoaderError, LoaderRequest, require_path

# name -> module with a ``build(cfg, req) -> Loader``; imported on use, so optional backends
# (ffcv, dali) cost nothing when they are not installed.
BACKENDS = {
    "torchvision": "loaders.torchvision_loader",
    "ffcv": "loaders.ffcv_loader",
    "dali": "loaders.dali_loader",
    "synthetic": "loaders.synthetic",
}


def build_loader(backend: str, cfg: DataConfig, req: LoaderRequest) -> Loader:
    if backend not in BACKENDS:
        raise LoaderError(f"loader={backend!r}: unknown backend (choose from {', '.join(BACKENDS)})")
    try:
        module = importlib.import_module(BACKENDS[backend])
    except ImportError as exc:  # the optional dependency itself is missing
        raise LoaderError(f"loader={backend}: {exc} (install it with: pip install -e '.[{backend}]')") from exc
    return module.build(cfg, req)


# batches a backend decodes ahead of the step: torchvision per worker, ffcv's batches_ahead (DALI's
# queue is data.dali.prefetch)
TORCHVISION_PREFETCH_FACTOR, FFCV_BATCHES_AHEAD = 4, 3


def prefetch_batches(backend: str, cfg: DataConfig) -> int:
    """How many batches the backend can hold ready before training asks: a throughput measured over
    fewer steps than this (after start-up) measures start-up decoding, not the loader's rate."""
    return {"torchvision": cfg.num_workers * TORCHVISION_PREFETCH_FACTOR, "dali": cfg.dali.prefetch,
            "ffcv": FFCV_BATCHES_AHEAD}.get(backend, 0)


# what each backend reads from a split's path: an image folder, a .beton file, nothing
SOURCES = {"torchvision": "dir", "ffcv": "file", "dali": "dir", "synthetic": None}


def check_split(backend: str, cfg: DataConfig, split: str) -> None:
    """The split's path is there and of the kind the backend reads, or a LoaderError naming its key."""
    if SOURCES.get(backend):
        require_path(getattr(cfg, split), f"data.{split}", kind=SOURCES[backend])


def shard(num_items: int, rank: int, world_size: int) -> range:
    """The items one process evaluates: every item exactly once across processes, no padding."""
    return range(rank, num_items, world_size)


def subset_indices(num_items: int, subset: Optional[int], seed: int) -> np.ndarray:
    """The items of a split a request reads: all of them, or ``subset`` of them drawn with ``seed``
    (the same on every process and every epoch), in file order."""
    if subset is None or subset >= num_items:
        return np.arange(num_items)
    return np.sort(np.random.default_rng(seed).choice(num_items, size=subset, replace=False))


__all__ = ["BACKENDS", "SOURCES", "DataConfig", "Loader", "LoaderError", "LoaderRequest", "build_loader",
           "check_split", "prefetch_batches", "shard", "subset_indices"]
