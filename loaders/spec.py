"""What a loader is asked for, and what every backend gives back (docs/design.md, `loaders/`).

A backend yields ``(views, labels)``: ``views`` is a tuple of ``num_views`` image tensors
``[B, 3, H, W]`` already on the training device, normalised, channels_last when asked;
``labels`` is ``[B]`` int64 on the same device. A backend is told how many views to make and
which augmentation to apply to each (one for all, or one per view); it never knows which method runs.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Protocol, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fasttrain.errors import LoaderError  # a data problem: one line, exit status 2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# padcrop_*: the official CDS CIFAR views (a 4-pixel padded random crop instead of a resized one); which
# backend makes which augmentation is registered in loaders.BACKENDS
Augment = Literal["contrastive", "simclr", "basic", "center", "padcrop_cutout", "padcrop_contrastive"]
# ColorJitter (brightness, contrast, saturation, hue) applied with p=0.8, then grayscale p=0.2:
# SupCon/SelfCon's strength, and SimCLR's (which adds a Gaussian blur, see blur_kernel)
COLOUR_STRENGTH = {"contrastive": (0.4, 0.4, 0.4, 0.1), "simclr": (0.8, 0.8, 0.8, 0.2)}
BLUR_SIGMA, BLUR_P = (0.1, 2.0), 0.5


def blur_kernel(image_size: int) -> int:
    """SimCLR's blur window: 10% of the image side, odd (1, no blur, below 20 px)."""
    return int(0.1 * image_size) // 2 * 2 + 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FFCVOptions(_Strict):
    order: Literal["random", "quasi_random"] = "quasi_random"
    os_cache: bool = True


class DALIOptions(_Strict):
    # two views: decode each JPEG once and crop it per view (solo-learn), or one fused random-crop
    # decode per view (nvJPEG/libjpeg-turbo decode only the crop's region, twice)
    decode: Literal["once", "per_view"] = "once"
    # where decoding and augmentation run when training on a GPU: the GPU (nvJPEG, `mixed`), or the
    # CPU (libjpeg-turbo) with the finished batch copied to the GPU by DALI: NVIDIA's advice for heavy
    # networks, whose GPU has no time to spare. Without a GPU, the CPU either way.
    device: Literal["gpu", "cpu"] = "gpu"
    threads: Optional[int] = Field(None, gt=0)  # DALI's CPU threads per process (default: data.num_workers)
    prefetch: int = Field(2, gt=0)  # batches DALI prepares ahead (prefetch_queue_depth)


class ProgressiveResizing(_Strict):
    """ffcv-imagenet's resolution ramp: min_size until start_epoch, linear to max_size at end_epoch."""

    min_size: int = Field(160, gt=0)
    max_size: int = Field(192, gt=0)
    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(1, ge=0)
    step: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_size > self.max_size:
            raise ValueError(f"min_size={self.min_size} is larger than max_size={self.max_size}")
        if self.start_epoch > self.end_epoch:
            raise ValueError(f"start_epoch={self.start_epoch} is after end_epoch={self.end_epoch}")
        return self

    def size_at(self, epoch: int) -> int:
        if epoch <= self.start_epoch:
            return self.min_size
        if epoch >= self.end_epoch:
            return self.max_size
        frac = (epoch - self.start_epoch) / max(1, self.end_epoch - self.start_epoch)
        size = self.min_size + frac * (self.max_size - self.min_size)
        return int(round(size / self.step)) * self.step


class DataConfig(_Strict):
    """The `data:` section of a recipe."""

    train: Optional[Path] = None  # ImageFolder directory (torchvision, dali) or .beton file (ffcv)
    val: Optional[Path] = None
    image_size: int = Field(224, gt=0)
    val_resize_ratio: float = Field(0.875, gt=0, le=1)  # validation: resize shorter side to size/ratio
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # one crop scale per training view (the official CDS ImageNet views: 0.08-1 for the classifier's,
    # 0.2-1 for the contrastive one); default: crop_scale for every view
    view_crop_scales: Optional[tuple[tuple[float, float], ...]] = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment: Literal["contrastive", "simclr", "basic"] = "contrastive"
    # one augmentation per view, instead of the method's own (CDS: basic, contrastive) or `augment`
    view_augments: Optional[tuple[Literal["contrastive", "simclr", "basic", "padcrop_cutout",
                                          "padcrop_contrastive"], ...]] = None
    num_workers: int = Field(4, ge=0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # where the colour augmentation and the normalisation run (torchvision, ffcv): on the training device,
    # batched, the workers handing over uint8 crops (loaders/device_stage.py), or in the workers. auto: the
    # device when it is a GPU; on a CPU the workers, which overlap with the step instead of adding to it
    colour_stage: Literal["auto", "device", "host"] = "auto"
    # where the JPEGs are decoded (torchvision loader): in the workers (PIL), or on the training device
    # (torchvision.io.decode_jpeg, nvJPEG on a GPU; loaders/device_decode.py): the workers then only read
    # bytes and draw crops, and the colour runs on the device too
    decode: Literal["host", "device"] = "host"
    num_classes: Optional[int] = Field(None, gt=0)  # synthetic data only; real data counts its folders
    synthetic_samples: int = Field(4096, gt=0)
    ffcv: FFCVOptions = FFCVOptions()
    dali: DALIOptions = DALIOptions()
    progressive: Optional[ProgressiveResizing] = None

    @model_validator(mode="after")
    def _ranges(self):
        for key, (lo, hi) in (("crop_scale", self.crop_scale),
                              *((f"view_crop_scales[{v}]", s) for v, s in enumerate(self.view_crop_scales or ()))):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{key}={[lo, hi]} must satisfy 0 < min <= max <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio={list(self.crop_ratio)} must satisfy 0 < min <= max")
        return self

    def for_view(self, view: int, num_views: int) -> "DataConfig":
        """The settings of training view ``view`` of ``num_views``: its own crop scale where
        view_crop_scales gives one per view."""
        scales = self.view_crop_scales
        if scales is None or len(scales) != num_views:
            return self
        return self.model_copy(update={"crop_scale": scales[view]})


@dataclass(frozen=True)
class LoaderRequest:
    """Everything about one loader that is not in the recipe's data section."""

    split: Literal["train", "val"]
    batch_size: int  # per process
    augment: Union[Augment, tuple[Augment, ...]]  # one for every view, or one per view
    num_views: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    channels_last: bool = False
    subset: Optional[int] = None  # a seeded random subset of this many samples of the split, the same every epoch

    def __post_init__(self):
        if self.num_views not in (1, 2):
            raise ValueError(f"num_views={self.num_views}: a loader makes 1 or 2 views")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"subset={self.subset} must be positive")
        if isinstance(self.augment, tuple) and (len(self.augment) != self.num_views or "center" in self.augment):
            raise ValueError(f"augment={self.augment}: one training augmentation per view ({self.num_views})")

    @property
    def augments(self) -> tuple[str, ...]:
        """The augmentation of each view."""
        return self.augment if isinstance(self.augment, tuple) else (self.augment,) * self.num_views

    @property
    def training(self) -> bool:
        """Random order and full, equal batches on every process. A center-cropped read (of either
        split: a k-NN bank, cached linear-evaluation features) is an evaluation read: file order,
        sharded without padding, the last batch kept."""
        return self.split == "train" and "center" not in self.augments


class Loader(Protocol):
    num_samples: int  # samples this process yields per epoch
    num_classes: int
    skipped: set[str]  # files that could not be decoded (skipped, with a warning)

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Set the epoch's order; a resumed epoch starts after its first ``skip_batches`` batches."""

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]: ...


def output_dtype(cfg: DataConfig) -> torch.dtype:
    return getattr(torch, cfg.output_dtype)


def require_path(path: Optional[Path], key: str, *, kind: str = "dir") -> Path:
    """The path a recipe key names, or a LoaderError naming the key and the path. ``dir``: an image
    folder (torchvision, dali), checked for symlink loops; ``file``: a .beton (ffcv)."""
    if path is None:
        raise LoaderError(f"{key}: no path given")
    path = Path(path).expanduser()
    if kind == "dir" and path.is_file():
        raise LoaderError(f"{key}: {path} is a file; this loader reads an image folder (one sub-folder per "
                          f"class){'; a .beton is read by loader=ffcv' if path.suffix == '.beton' else ''}")
    if kind == "file" and path.is_dir():
        raise LoaderError(f"{key}: {path} is a directory; loader=ffcv reads a .beton file "
                          f"(make one with: python -m loaders.ffcv_convert {path} OUT.beton)")
    if kind == "dir" and not path.is_dir():
        raise LoaderError(f"{key}: no such directory: {path}")
    if kind == "file" and not path.is_file():
        raise LoaderError(f"{key}: no such file: {path}")
    if kind == "dir":
        _refuse_symlink_loops(str(path.resolve()), str(path), key)
    return path


@functools.lru_cache(maxsize=16)
def _refuse_symlink_loops(root: str, shown_root: str, key: str) -> None:
    """A link to a folder above it makes a folder walk (ImageFolder's, DALI's) see the same images
    again and again under longer paths, in the wrong classes: refuse it, naming the link."""
    def walk(shown: str, real: str, ancestors: frozenset) -> None:
        with os.scandir(real) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=True):
                    continue
                target = os.path.realpath(entry.path)
                if target in ancestors:
                    raise LoaderError(f"{key}: {os.path.join(shown, entry.name)} links back to {target}, a "
                                      f"folder above it (a loop): remove the link")
                walk(os.path.join(shown, entry.name), target, ancestors | {target})

    walk(shown_root, root, frozenset({root}))


def _visible(name: str) -> bool:
    """Hidden and OS-metadata entries (``.ipynb_checkpoints/``, ``__MACOSX/``, AppleDouble ``._x.jpg``)
    are neither classes nor images."""
    return not name.startswith((".", "__MACOSX"))


def class_names(root: Path) -> list[str]:
    """The class folders of an image folder, sorted as torchvision sorts them, hidden ones left out."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


def class_difference(expected: Sequence[str], own: Sequence[str]) -> str:
    """How a split's class list differs from the training split's, in words."""
    missing, extra = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    return "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                       f"extra {', '.join(extra)}" if extra else "") if part) \
        or "numbered in another order"


def image_folder(root: Path, key: str, classes: Optional[Sequence[str]] = None):
    """torchvision's ImageFolder of ``root`` whose labels index ``classes`` (the training split's, so
    that every split of a dataset numbers its classes alike; default: ``root``'s own). Only visible
    regular files (or links to them) with an image extension are images: a FIFO or a socket would
    block the reader. A split whose class folders differ from ``classes`` is one LoaderError naming
    the missing and extra ones."""
    from torchvision import datasets
    from torchvision.datasets.folder import IMG_EXTENSIONS

    own = class_names(root)
    if not own:
        raise LoaderError(f"{key}: {root} has no class folders (one sub-folder of images per class)")
    classes = list(classes) if classes is not None else own
    if set(classes) != set(own):
        raise LoaderError(f"{key}: {root} has other class folders than the training split: "
                          f"{class_difference(classes, own)}")

    class Folder(datasets.ImageFolder):
        def find_classes(self, directory):
            return classes, {name: index for index, name in enumerate(classes)}

    def is_image(path: str) -> bool:
        name = os.path.basename(path)
        return _visible(name) and name.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(path)

    try:
        return Folder(str(root), is_valid_file=is_image)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images in them
        raise LoaderError(f"{key}: {exc}") from exc


def load_rgb(path: str):
    """An image file as an 8-bit RGB PIL image, the same pixels every backend sees: EXIF orientation
    applied (as DALI's decoder does), 16-bit greyscale scaled to 8 bits rather than clipped to white,
    palette and alpha images converted. What torchvision's loader and the FFCV converter read."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG/TIFF greyscale: 0-65535
            import numpy as np
            pixels = np.asarray(image, dtype=np.uint32) >> 8
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")


JPEG_MARKER = b"\xff\xd8\xff"


def load_rgb_tensor(path: str) -> torch.Tensor:
    """``load_rgb``'s pixels as uint8 ``[3, H, W]``: a JPEG through torchvision's libjpeg-turbo decoder
    (``decode_jpeg``, EXIF orientation applied: the same pixels as PIL's, in half the time here:
    benchmarks/decode_ceiling.py), anything else, or a JPEG it refuses, through ``load_rgb`` (which
    raises for an unreadable file)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(JPEG_MARKER):
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except RuntimeError:  # truncated, or a variant libjpeg-turbo's build here lacks: PIL decides
            pass
    import numpy as np

    return torch.from_numpy(np.array(load_rgb(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def classes_file(beton: Path) -> Path:
    """Where ``ffcv_convert`` writes the class names a .beton's labels index: ``X.classes.json`` beside ``X.beton``."""
    return Path(beton).with_suffix(".classes.json")


def beton_classes(beton: Path) -> Optional[list[str]]:
    """The class names a .beton's labels index; None for one written without them."""
    path = classes_file(beton)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoaderError(f"{path}: not a readable class list ({exc})") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise LoaderError(f"{path}: not a list of class names")
    return names


def split_classes(cfg: "DataConfig", split: str) -> Optional[list[str]]:
    """The class list every split of ``cfg`` is numbered by: the training split's class folders, or the
    class list beside its .beton (None where it has neither: synthetic data, a .beton of an earlier
    fasttrain)."""
    train = cfg.train
    if train is None:
        return None
    train = Path(train).expanduser()
    return class_names(train) if train.is_dir() else beton_classes(train) if train.is_file() else None


def to_device(x: torch.Tensor, req: LoaderRequest, dtype: torch.dtype) -> torch.Tensor:
    """Move a batch of images to the training device in the requested dtype and layout."""
    fmt = torch.channels_last if req.channels_last else torch.contiguous_format
    return x.to(req.device, dtype=dtype, non_blocking=True, memory_format=fmt)
