"""FFCV backend: a .beton file (``python -m loaders.ffcv_convert``) -> ``(views, labels)`` on the device.

Two views. ffcv 1.0.2's ``Loader`` has no ``custom_field_mapper``, but its ``pipelines`` dict takes a
``PipelineSpec(source, decoder, transforms)``: an output name that is not a field of the file, whose
``source`` names the field to read. The second view is ``"image_1": PipelineSpec("image", <own
RandomResizedCrop decoder>, [...])``: ffcv's graph gives it its own decoder node on the same field, so
each sample is read once from the file and decoded twice, with independent crops and flips. The
batch comes back as ``(image, label, image_1)``: file fields first, extra outputs after.

Colour and normalisation. ``contrastive`` adds the official ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 and
RandomGrayscale p=0.2 as torch ops on the whole device batch (``color_augment``: torchvision's maths,
a per-sample draw of factors and op order, no loop over samples), on values in [0, 1] after
ToTensor/ToDevice/ToTorchImage, then ``(x - mean) / std``. Without colour augmentation on CPU,
ffcv's ``NormalizeImage`` runs in the numba stage *before* ToTensor (placed after it on CPU,
``Loader()`` never returns: ffcv 1.0.2's ``Graph.group_operations`` loops for ever). On CUDA the
uint8 batch goes to the device and is normalised there by the same torch code: ffcv's GPU
``NormalizeImage`` needs cupy, which this project does not install.

Distributed. Training passes ``distributed=True``: ffcv then builds a torch ``DistributedSampler``
(rank and world size from ``torch.distributed``, ``drop_last=False``: it pads); QUASI_RANDOM is not
implemented there, so RANDOM is used. Validation does not use ffcv's distributed mode (its padding
would count samples twice): each process reads ``loaders.shard`` of the file in SEQUENTIAL order.

Noise. ``Exception ignored in: <finalize ...> KeyError: (Array(uint8 ...`` comes from numba's
per-dispatcher ``weakref.finalize`` (numba/core/dispatcher.py, ``_make_finalizer.<locals>.finalizer``)
iterating a dead dispatcher's ``overloads`` dict. The cause is ffcv 1.0.2's
``OSCacheManager.state_type`` (and ProcessCacheManager's), which sets ``.mutable = False`` on numba's
shared, interned ``uint8[::1]`` type at every ``Loader()``: the hash of signature keys that hold it
changes, so those dicts can no longer find them. A ``sys.unraisablehook`` filter drops exactly those
reports (KeyError, innermost frame that finalizer); all else reaches the previous hook.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import numba
import numpy as np
import torch

_TORCH_THREADS = torch.get_num_threads()  # importing ffcv sets it to 1 (ffcv/pipeline/compiler.py)
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader as _FFCVLoader, OrderOption  # noqa: E402
from ffcv.pipeline import PipelineSpec  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)

from loaders import FFCV_BATCHES_AHEAD, shard, subset_indices
from loaders.spec import DataConfig, LoaderError, LoaderRequest, on_device, output_dtype, require_path, to_device

log = logging.getLogger(__name__)
_NUMBA_DISPATCHER = os.path.join("numba", "core", "dispatcher.py")


def _is_numba_finalizer_noise(unraisable) -> bool:
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(unraisable.exc_value, KeyError) and tb is not None
            and tb.tb_frame.f_code.co_name == "finalizer"
            and tb.tb_frame.f_code.co_filename.endswith(_NUMBA_DISPATCHER))


def _quiet_hook(previous):
    def hook(unraisable):
        if not _is_numba_finalizer_noise(unraisable):
            previous(unraisable)
    hook.quiets_numba_finalizer = True
    return hook


if not getattr(sys.unraisablehook, "quiets_numba_finalizer", False):
    sys.unraisablehook = _quiet_hook(sys.unraisablehook)


# --- colour augmentation: torchvision's ColorJitter / RandomGrayscale maths, batched ---------------

def _gray(x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,1,H,W], torchvision's rgb_to_grayscale
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x, y, f):  # torchvision's _blend; f == 1 is an exact identity
    return (f * x + (1.0 - f) * y).clamp_(0.0, 1.0)


# rows: hue sector 0..5; columns: r, g, b; values index (maxc, q, p, t)
_HSV_SECTOR_PICK = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]])


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # torchvision's _rgb2hsv/_hsv2rgb
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc, cr = maxc == minc, maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = (torch.fmod(h / 6.0 + 1.0, 1.0) + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (maxc * (1.0 - s)).clamp(0.0, 1.0)
    q = (maxc * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (maxc * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # per sector i, torchvision's hsv->rgb picks each channel from (maxc, q, p, t): a lookup + gather
    candidates = torch.stack((maxc, q, p, t), 1)  # [B,4,H,W]
    pick = on_device(_HSV_SECTOR_PICK, x.device)[i.long()]  # [B,H,W,3]
    return torch.gather(candidates, 1, pick.permute(0, 3, 1, 2))


_OPS = (lambda x, f: (f * x).clamp_(0.0, 1.0),  # brightness: blend with black
        lambda x, f: _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f),  # contrast
        lambda x, f: _blend(x, _gray(x), f))  # saturation; op 3 is hue


def jitter(x, factors, order, apply, gray):
    """x [B,3,H,W] in [0,1]; factors [B,4] (brightness, contrast, saturation, hue shift); order [B,4]
    a permutation of the op ids 0..3 per sample; apply, gray [B] bool. Same result as torchvision
    applying, per sample, the ops in ``order`` with those factors, then grayscale where ``gray``.

    Hue is the costly op, so it runs once on the batch: per sample, the ops before it are applied
    position by position (the others get their identity factor 1), then hue, then the ops after it.
    """
    B = x.shape[0]
    hue_at = (order == 3).to(torch.int64).argmax(1)
    for before in (True, False):
        for k in (range(0, 3) if before else range(1, 4)):
            here = (hue_at > k) if before else (hue_at < k)
            for op, fn in enumerate(_OPS):
                use = apply & here & (order[:, k] == op)
                x = fn(x, torch.where(use, factors[:, op], torch.ones_like(factors[:, op])).view(B, 1, 1, 1))
        if before:
            x = torch.where(apply.view(B, 1, 1, 1), _adjust_hue(x, factors[:, 3]), x)
    return torch.where(gray.view(B, 1, 1, 1), _gray(x).expand_as(x), x)


@functools.lru_cache(maxsize=8)
def _jitter_range(strength: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ColorJitter's factor ranges, built once per device (a tensor made from Python values on a GPU
    is a synchronising copy from pageable memory)."""
    lo = torch.tensor([max(0.0, 1 - s) for s in strength[:3]] + [-strength[3]], device=device)
    hi = torch.tensor([1 + s for s in strength[:3]] + [strength[3]], device=device)
    return lo, hi


def color_augment(x: torch.Tensor, gen: torch.Generator, strength=(0.4, 0.4, 0.4, 0.1),
                  p_jitter: float = 0.8, p_gray: float = 0.2) -> torch.Tensor:
    """RandomApply(ColorJitter(*strength), p_jitter) then RandomGrayscale(p_gray), one draw per sample."""
    B, dev = x.shape[0], x.device
    u = torch.rand(B, 7, device=dev, generator=gen)
    lo, hi = _jitter_range(tuple(strength), dev)
    factors = lo + (hi - lo) * u[:, :4]
    order = torch.rand(B, 4, device=dev, generator=gen).argsort(1)
    return jitter(x, factors, order, u[:, 4] < p_jitter, u[:, 5] < p_gray)


# --- the loader ---------------------------------------------------------------------------------

def _open_beton(path: Path, key: str) -> Reader:
    path = require_path(path, key, kind="file")
    try:
        reader = Reader(str(path))
        fields = reader.handlers
    except Exception as exc:  # ffcv raises AssertionError/ValueError/IndexError on a foreign file
        raise LoaderError(f"{key}: {path} is not a readable .beton file ({type(exc).__name__}: {exc})") from exc
    if not (isinstance(fields.get("image"), RGBImageField) and isinstance(fields.get("label"), IntField)):
        raise LoaderError(f"{key}: {path} has fields {list(fields)}; expected 'image' (RGB) and 'label' (int)")
    if reader.num_samples == 0:
        raise LoaderError(f"{key}: {path} holds no samples")
    return reader


class FFCVLoader:
    def __init__(self, cfg: DataConfig, req: LoaderRequest):
        key = f"data.{req.split}"
        if "simclr" in req.augments:  # its blur is not among ffcv's ops; refused rather than left out
            raise LoaderError("data.augment=simclr: the ffcv backend has no Gaussian blur; use loader=torchvision "
                              "or loader=dali")
        reader = _open_beton(getattr(cfg, req.split), key)
        self.cfg, self.req, self.dtype = cfg, req, output_dtype(cfg)
        self.num_classes = int(reader.metadata["f1"].max()) + 1
        self.skipped: set[str] = set()  # unreadable files were left out by ffcv_convert
        self.epoch = self.skip_batches = 0
        self._cuda = req.device.type == "cuda"  # the GPU-only branch: ToDevice in the pipelines
        self._torch_norm = self._cuda or "contrastive" in req.augments
        self._mean = torch.tensor(cfg.mean, device=req.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, device=req.device).view(1, 3, 1, 1)
        self._gen = torch.Generator(device=req.device)

        size = cfg.progressive.size_at(0) if (cfg.progressive and req.training) else cfg.image_size
        if req.training:
            self._decoders = [RandomResizedCropRGBImageDecoder((size, size), scale=tuple(cfg.crop_scale),
                                                               ratio=tuple(cfg.crop_ratio))
                              for _ in range(req.num_views)]
        else:
            self._decoders = [CenterCropRGBImageDecoder((size, size), ratio=cfg.val_resize_ratio)
                              for _ in range(req.num_views)]
        pipelines = {"image": self._image_ops(self._decoders[0]),
                     "label": [IntDecoder(), ToTensor(), *self._to_device()]}  # no Squeeze: a batch of 1 -> 0-d
        for v, dec in enumerate(self._decoders[1:], 1):  # same field, own decoder: see the docstring
            ops = self._image_ops(dec)
            pipelines[f"image_{v}"] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:])

        world, distributed = req.world_size, False
        items = subset_indices(int(reader.num_samples), req.subset, req.seed)
        indices = items if req.subset else None
        if req.training:
            order = OrderOption.QUASI_RANDOM if cfg.ffcv.order == "quasi_random" else OrderOption.RANDOM
            if world > 1:
                self._check_process_group(key)
                if order == OrderOption.QUASI_RANDOM:
                    log.info("%s: ffcv 1.0.2 has no distributed QUASI_RANDOM order; using RANDOM", key)
                distributed, order = True, OrderOption.RANDOM
        else:
            order = OrderOption.SEQUENTIAL
            indices = items[np.asarray(shard(len(items), req.rank, world), dtype=np.int64)]
        threads = max(1, min(cfg.num_workers, numba.config.NUMBA_NUM_THREADS))
        torch_threads = torch.get_num_threads()
        try:
            self._loader = _FFCVLoader(str(reader.file_name), batch_size=req.batch_size, num_workers=threads,
                                       batches_ahead=FFCV_BATCHES_AHEAD,
                                       os_cache=cfg.ffcv.os_cache, order=order, distributed=distributed,
                                       seed=req.seed, indices=indices, pipelines=pipelines,
                                       drop_last=req.training)
        finally:
            torch.set_num_threads(torch_threads)  # ffcv sets torch's thread count to num_workers
        if req.training and len(self._loader) == 0:
            raise LoaderError(f"{key}: {len(self._loader.first_traversal_order)} images per process, fewer "
                              f"than one batch of {req.batch_size}")
        self.num_samples = len(self._loader) * req.batch_size if req.training else len(indices)
        self.set_epoch(0)

    def _to_device(self):  # a fresh op per pipeline: ffcv keys its graph nodes by operation
        return [ToDevice(self.req.device, non_blocking=True)] if self._cuda else []

    def _image_ops(self, decoder):
        ops = [decoder] + ([RandomHorizontalFlip()] if self.req.training else [])
        if not self._torch_norm:  # numba stage, before ToTensor (see the docstring)
            ops.append(NormalizeImage(np.array(self.cfg.mean) * 255, np.array(self.cfg.std) * 255, np.float32))
        return ops + [ToTensor(), *self._to_device(), ToTorchImage(channels_last=True)]

    def _check_process_group(self, key):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise LoaderError(f"{key}: loader=ffcv with world_size={self.req.world_size} needs torch.distributed "
                              "initialised first (ffcv takes rank and world size from it)")
        if (dist.get_rank(), dist.get_world_size()) != (self.req.rank, self.req.world_size):
            raise LoaderError(f"{key}: rank/world {self.req.rank}/{self.req.world_size} differ from "
                              f"torch.distributed's {dist.get_rank()}/{dist.get_world_size()}")

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches
        self._loader.next_epoch = epoch  # ffcv seeds the order with (seed, epoch)
        self._gen.manual_seed(self.req.seed * 1_000_003 + epoch * 1009 + self.req.rank)
        if self.cfg.progressive and self.req.training:  # as ffcv-imagenet: buffers follow at the next epoch
            size = self.cfg.progressive.size_at(epoch)
            for dec in self._decoders:
                dec.output_size = (size, size)

    def _finish(self, x: torch.Tensor, augment: str) -> torch.Tensor:
        if x.dtype == torch.uint8:  # not normalised yet: [0,1], colour augmentation, normalisation
            x = x.to(torch.float32).div_(255)
            if augment == "contrastive":
                x = color_augment(x, self._gen)
            return to_device(x.sub_(self._mean).div_(self._std), self.req, self.dtype)
        out = to_device(x, self.req, self.dtype)
        # ffcv reuses its output buffers a few batches later: never hand one out
        return out.clone() if out.data_ptr() == x.data_ptr() else out

    def __iter__(self):
        torch_threads = torch.get_num_threads()
        try:  # ffcv's batch thread sets torch's thread count to num_workers before its first batch
            for index, batch in enumerate(self._loader):
                torch.set_num_threads(torch_threads)
                images = tuple(self._finish(x, a) for x, a in zip((batch[0], *batch[2:]), self.req.augments))
                if index >= self.skip_batches:  # a resumed epoch: decoded and dropped, so its randomness matches
                    yield images, batch[1].to(self.req.device, copy=True).view(-1)
        finally:
            torch.set_num_threads(torch_threads)


def build(cfg: DataConfig, req: LoaderRequest) -> FFCVLoader:
    return FFCVLoader(cfg, req)
