"""FFCV backend: a .beton file (``python -m loaders.ffcv_convert``) -> ``(views, labels)`` on the device.

Views. ffcv decodes once per pipeline: two views as two pipelines on the one field decode every JPEG
twice (0.52 of the decode + crop ceiling on a CPU). Training therefore reads one pipeline whose
decoder (``ViewCropsDecoder``) decodes each image once and cuts every view from it: its own
RandomResizedCrop (ffcv's draw, the view's crop scale) and flip, into ``[B, V, H, W, 3]`` uint8. The
views are split off after ``ToTensor``/``ToDevice`` (a permuted view each: channels_last, as
``ToTorchImage`` gives). Evaluation decodes one centre crop (ffcv's decoder) and hands it to each view.

Colour and normalisation. With the colour on the device (``data.colour_stage: device``, or ``auto``
on a GPU: ffcv-imagenet's pattern) the pipeline ends ``ToTensor -> ToDevice`` on the uint8 crops
(evaluation: ``-> ToTorchImage``; training splits its views as above) and ``loaders.device_stage``
adds the colour and the normalisation, batched on the device. Otherwise (``auto`` on a CPU,
``host``), ``contrastive`` adds the official ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 and
RandomGrayscale p=0.2 as an ffcv operation (``ColourJitter``) on the uint8 batch right after the
crop and flip: torchvision's tensor maths per sample (a draw of factors and op order each), compiled
by numba and run in parallel over the batch in ffcv's own threads, like its decoders, so it never
occupies the training process: on a CPU-only machine that is where it measures fastest. On a CPU,
ffcv's ``NormalizeImage`` follows in the same numba stage, *before* ToTensor (placed after it on
CPU, ``Loader()`` never returns: ffcv 1.0.2's ``Graph.group_operations`` loops for ever). On CUDA
with the colour on the host, the uint8 batch goes to the device (``ToDevice``) and is normalised
there by torch (ffcv's GPU ``NormalizeImage`` needs cupy, which this project does not install). Like
ffcv's own crops, the host colour draws come from numba's per-thread generator, which ffcv does not
seed.

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

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numba
import numpy as np
import torch

_TORCH_THREADS = torch.get_num_threads()  # importing ffcv sets it to 1 (ffcv/pipeline/compiler.py)
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader as _FFCVLoader, OrderOption  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)

# first-party imports after the third-party ffcv ones, which must follow the thread count's capture above
from loaders import FFCV_BATCHES_AHEAD, shard, subset_indices  # noqa: E402
from loaders.spec import (COLOUR_STRENGTH, DataConfig, LoaderError, LoaderRequest, beton_classes,  # noqa: E402
                          class_difference, output_dtype, require_path, split_classes, to_device)
from loaders.device_stage import DeviceColour, device_stages  # noqa: E402

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


# --- colour augmentation: torchvision's ColorJitter / RandomGrayscale maths, per sample in ffcv's threads ---

@numba.njit(inline="always")
def _luma(r, g, b):  # torchvision's rgb_to_grayscale weights
    return np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b


@numba.njit(inline="always")
def _unit(v):
    return min(max(v, np.float32(0.0)), np.float32(1.0))


@numba.njit(inline="always")
def _shift_hue(r, g, b, shift):
    """torchvision's _rgb2hsv, the hue turned by ``shift``, then _hsv2rgb, for one pixel."""
    one = np.float32(1.0)
    maxc, minc = max(r, g, b), min(r, g, b)
    cr = maxc - minc
    s = cr / (maxc if cr != 0 else one)
    div = cr if cr != 0 else one
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    if maxc == r:
        h = bc - gc
    elif maxc == g:
        h = np.float32(2.0) + rc - bc
    else:
        h = np.float32(4.0) + gc - rc
    h = ((h / np.float32(6.0) + one) % one + shift) % one
    sector = np.floor(h * np.float32(6.0))
    f = h * np.float32(6.0) - sector
    p, q, t = _unit(maxc * (one - s)), _unit(maxc * (one - s * f)), _unit(maxc * (one - s * (one - f)))
    i = int(sector) % 6
    if i == 0:
        return maxc, t, p
    if i == 1:
        return q, maxc, p
    if i == 2:
        return p, maxc, t
    if i == 3:
        return p, q, maxc
    if i == 4:
        return t, p, maxc
    return maxc, p, q


@numba.njit
def jitter_image(src, dst, factors, order, apply, gray):
    """One HWC uint8 image: torchvision's ColorJitter ops (0 brightness, 1 contrast, 2 saturation,
    3 hue; ``factors`` of each, in ``order``) when ``apply``, then grayscale when ``gray``, in float
    as torchvision's tensor functions, rounded to uint8 once at the end."""
    height, width = src.shape[0], src.shape[1]
    x = src.astype(np.float32) / np.float32(255.0)
    one = np.float32(1.0)
    for k in range(4 if apply else 0):
        op, f = order[k], np.float32(factors[order[k]])
        if op == 1:  # contrast: blend with the image's mean grey, computed at this point of the order
            total = 0.0
            for y in range(height):
                for z in range(width):
                    total += _luma(x[y, z, 0], x[y, z, 1], x[y, z, 2])
            mean = np.float32(total / (height * width))
        for y in range(height):
            for z in range(width):
                r, g, b = x[y, z, 0], x[y, z, 1], x[y, z, 2]
                if op == 0:  # brightness: blend with black
                    r, g, b = _unit(f * r), _unit(f * g), _unit(f * b)
                elif op == 1:
                    r, g, b = _unit(f * r + (one - f) * mean), _unit(f * g + (one - f) * mean), \
                        _unit(f * b + (one - f) * mean)
                elif op == 2:  # saturation: blend with the pixel's grey
                    grey = _luma(r, g, b)
                    r, g, b = _unit(f * r + (one - f) * grey), _unit(f * g + (one - f) * grey), \
                        _unit(f * b + (one - f) * grey)
                else:
                    r, g, b = _shift_hue(r, g, b, f)
                x[y, z, 0], x[y, z, 1], x[y, z, 2] = r, g, b
    for y in range(height):
        for z in range(width):
            if gray:
                v = np.uint8(_luma(x[y, z, 0], x[y, z, 1], x[y, z, 2]) * np.float32(255.0) + np.float32(0.5))
                dst[y, z, 0] = dst[y, z, 1] = dst[y, z, 2] = v
            else:
                for c in range(3):
                    dst[y, z, c] = np.uint8(x[y, z, c] * np.float32(255.0) + np.float32(0.5))


class ColourJitter(Operation):
    """Per view, RandomApply(ColorJitter(*strength), p_jitter) then RandomGrayscale(p_gray) (a view whose
    strength is None: untouched), one draw of factors and op order per image and view, on the uint8
    ``[B, V, H, W, 3]`` batch inside ffcv's pipeline: compiled with numba and run in parallel over the
    batch in ffcv's own threads, before ToTensor (and ToDevice on a GPU)."""

    def __init__(self, strengths: Sequence[Optional[tuple]] = ((0.4, 0.4, 0.4, 0.1),), p_jitter: float = 0.8,
                 p_gray: float = 0.2):
        super().__init__()
        rows = [s or (0.0, 0.0, 0.0, 0.0) for s in strengths]  # no strength: factors of 1, hue 0
        self.lo = np.array([[max(0.0, 1 - x) for x in r[:3]] + [-r[3]] for r in rows], np.float32)
        self.hi = np.array([[1 + x for x in r[:3]] + [r[3]] for r in rows], np.float32)
        self.p_jitter = np.array([p_jitter if s else 0.0 for s in strengths])
        self.p_gray = np.array([p_gray if s else 0.0 for s in strengths])

    def generate_code(self):
        my_range = Compiler.get_iterator()
        lo, span, p_jitter, p_gray = self.lo, self.hi - self.lo, self.p_jitter, self.p_gray

        def colour(images, dst):
            coins = np.random.rand(images.shape[0], images.shape[1], 6)
            for i in my_range(images.shape[0]):
                for v in range(images.shape[1]):
                    factors = lo[v] + span[v] * coins[i, v, :4].astype(np.float32)
                    jitter_image(images[i, v], dst[i, v], factors, np.random.permutation(4),
                                 coins[i, v, 4] < p_jitter[v], coins[i, v, 5] < p_gray[v])
            return dst

        colour.is_parallel = True
        return colour

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


@numba.njit
def mirror(image):
    """An HWC image flipped left-right in place."""
    width = image.shape[1]
    for y in range(image.shape[0]):
        for x in range(width // 2):
            for c in range(image.shape[2]):
                image[y, x, c], image[y, width - 1 - x, c] = image[y, width - 1 - x, c], image[y, x, c]


class ViewCropsDecoder(ResizedCropRGBImageDecoder):
    """Every view from one decode: per image, ffcv's RandomResizedCrop draw at each view's scale, its
    resize (``resize_crop``) and a flip with p=0.5, into ``[B, V, H, W, 3]`` uint8. ffcv's own decoder
    makes one crop per decode, so two views would decode each JPEG twice."""

    def __init__(self, output_size, scales: Sequence[tuple], ratio=(3 / 4, 4 / 3)):
        super().__init__(output_size)
        self.scales = np.array(scales, dtype=np.float64)  # [V, 2]
        self.ratio = np.array(ratio, dtype=np.float64)

    @property
    def get_crop_generator(self):
        return get_random_crop

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
        state, (_, decoded) = super().declare_state_and_memory(previous_state)
        shape = (len(self.scales), self.output_size[0], self.output_size[1], 3)
        return replace(state, shape=shape), (AllocationQuery(shape, np.dtype("<u1")), decoded)

    def generate_code(self):
        jpg, read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        crop_c = Compiler.compile(self.get_crop_generator)
        scales, ratio = self.scales, self.ratio

        def decode(batch_indices, storage, metadata, storage_state):
            destination, decoded = storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = decoded[dst_ix]
                    imdecode_c(data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                for v in range(scales.shape[0]):
                    i, j, h, w = crop_c(height, width, scales[v], ratio)
                    resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix, v])
                    if np.random.rand() < 0.5:
                        mirror(destination[dst_ix, v])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


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
    _check_image_bytes(reader, path, key)
    return reader


def _check_image_bytes(reader: Reader, path: Path, key: str, samples: int = 32) -> None:
    """A few images spread over the file, read as stored: a JPEG must start with its marker, and raw
    images must not all be zeros. ffcv decodes overwritten bytes to garbage without a word (a copy cut
    short and zero-filled, a disk error): caught here in milliseconds rather than after an epoch."""
    meta = reader.metadata["f0"]
    picks = np.unique(np.linspace(0, len(meta) - 1, min(samples, len(meta))).astype(np.int64))
    raw_zero = raw = 0
    with open(path, "rb") as f:
        for index in picks:
            mode, width, height, ptr = (int(meta[index][k]) for k in ("mode", "width", "height", "data_ptr"))
            f.seek(ptr)
            if mode == 0 and f.read(3) != b"\xff\xd8\xff":  # ffcv's IMAGE_MODES: jpg 0, raw 1
                raise LoaderError(f"{key}: {path}: image {index} is stored as a JPEG but its bytes are not one "
                                  f"(zeroed or overwritten): convert the folder again")
            if mode == 1:
                raw += 1
                raw_zero += not any(f.read(width * height * 3))
    if raw and raw_zero == raw:
        raise LoaderError(f"{key}: {path}: every raw image read ({raw}) is all zeros (zeroed or overwritten): "
                          f"convert the folder again")


def _check_classes(cfg: DataConfig, split: str, path: Path, key: str) -> Optional[list[str]]:
    """This split's class list, checked against the training split's: a validation .beton converted
    from a folder that lacks a class (or has an extra one) numbers every later class differently."""
    own = beton_classes(path)
    train = split_classes(cfg, split) if split != "train" else None
    if own is None or train is None or own == train:
        if own is None and train is not None:
            log.warning("%s: %s has no .classes.json beside it (converted by an earlier fasttrain): its labels "
                        "cannot be checked against the training split's classes", key, path)
        return own
    raise LoaderError(f"{key}: {path} holds other classes than the training split ({class_difference(train, own)}): "
                      f"convert it again with --classes-from TRAIN_DIR")


class FFCVLoader:
    def __init__(self, cfg: DataConfig, req: LoaderRequest):
        key = f"data.{req.split}"
        if "simclr" in req.augments:  # its blur is not among ffcv's ops; refused rather than left out
            raise LoaderError("data.augment=simclr: the ffcv backend has no Gaussian blur; use loader=torchvision "
                              "or loader=dali")
        reader = _open_beton(getattr(cfg, req.split), key)
        self.cfg, self.req, self.dtype = cfg, req, output_dtype(cfg)
        self.classes = _check_classes(cfg, req.split, Path(reader.file_name), key)
        self.num_classes = len(self.classes) if self.classes else int(reader.metadata["f1"].max()) + 1
        self.skipped: set[str] = set()  # unreadable files were left out by ffcv_convert
        self.epoch = self.skip_batches = 0
        self._cuda = req.device.type == "cuda"  # the GPU-only branch: ToDevice
        augments = req.augments if req.training else ("center",) * req.num_views
        # colour and normalisation on the device (uint8 crosses; ffcv-imagenet's pattern), or the colour
        # in ffcv's threads and, on a GPU, the normalisation on the device
        self.stages = device_stages(cfg, req, augments)
        self._host_colour = self.stages is None
        if self.stages is None and self._cuda:  # ffcv's GPU NormalizeImage needs cupy: torch's instead
            self.stages = [DeviceColour("center", cfg.image_size, cfg.mean, cfg.std)] * req.num_views

        size = cfg.progressive.size_at(0) if (cfg.progressive and req.training) else cfg.image_size
        if req.training:  # every view from one decode
            self._decoder = ViewCropsDecoder((size, size), [tuple(cfg.for_view(v, req.num_views).crop_scale)
                                                            for v in range(req.num_views)], tuple(cfg.crop_ratio))
        else:  # one centre crop, handed to every view
            self._decoder = CenterCropRGBImageDecoder((size, size), ratio=cfg.val_resize_ratio)
        pipelines = {"image": self._image_ops(augments),
                     "label": [IntDecoder(), ToTensor(), *self._to_device()]}  # no Squeeze: a batch of 1 -> 0-d

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

    def _image_ops(self, augments):
        ops = [self._decoder]
        if self._host_colour and any(a in COLOUR_STRENGTH for a in augments):
            ops.append(ColourJitter([COLOUR_STRENGTH.get(a) for a in augments]))
        if self.stages is None:  # numba stage, before ToTensor (see the docstring)
            ops.append(NormalizeImage(np.array(self.cfg.mean) * 255, np.array(self.cfg.std) * 255, np.float32))
        ops += [ToTensor(), *self._to_device()]
        # training's [B, V, H, W, 3] is split into views in __iter__; evaluation's [B, H, W, 3] is one
        return ops if self.req.training else ops + [ToTorchImage(channels_last=True)]

    def _views(self, images: torch.Tensor) -> tuple:
        """Per view ``[B, 3, H, W]`` (channels_last strides) of the pipeline's output."""
        if not self.req.training:
            return (images,) * self.req.num_views
        return tuple(images[:, v].permute(0, 3, 1, 2) for v in range(self.req.num_views))

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
        if self.cfg.progressive and self.req.training:  # as ffcv-imagenet: buffers follow at the next epoch
            size = self.cfg.progressive.size_at(epoch)
            self._decoder.output_size = (size, size)

    def _finish(self, x: torch.Tensor, stage) -> torch.Tensor:
        if stage is not None:  # uint8, the device stage's input (a new tensor: ffcv's buffer is not handed out)
            return to_device(stage(to_device(x, self.req, torch.uint8)), self.req, self.dtype)
        out = to_device(x, self.req, self.dtype)
        # ffcv reuses its output buffers a few batches later: never hand one out
        return out.clone() if out.data_ptr() == x.data_ptr() else out

    def __iter__(self):
        torch_threads = torch.get_num_threads()
        try:  # ffcv's batch thread sets torch's thread count to num_workers before its first batch
            for index, batch in enumerate(self._loader):
                torch.set_num_threads(torch_threads)
                images = tuple(self._finish(x, stage) for x, stage in
                               zip(self._views(batch[0]), self.stages or (None,) * self.req.num_views))
                if index >= self.skip_batches:  # a resumed epoch: decoded and dropped, so its randomness matches
                    yield images, batch[1].to(self.req.device, copy=True).view(-1)
        finally:
            torch.set_num_threads(torch_threads)


def build(cfg: DataConfig, req: LoaderRequest) -> FFCVLoader:
    return FFCVLoader(cfg, req)
