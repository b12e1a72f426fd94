"""JPEG decoding on the training device for the torchvision backend (``data.decode: device``): the
path that decodes on a GPU where DALI will not install.

* In the workers: read each file's bytes and draw each view's crop and flip from the JPEG header
  (``torchvision``'s RandomResizedCrop/RandomHorizontalFlip draws, in their order; the centre crop
  of ``Resize + CenterCrop`` for evaluation). Nothing is decoded there.
* On the device, per batch: one ``torchvision.io.decode_jpeg`` call for every JPEG of the batch
  (nvJPEG on a GPU, batched), then per image a crop (a view, no copy), an antialiased bilinear resize
  and the flip; the device stage (``DeviceColour``) adds the colour and the normalisation.

A file that is no JPEG, a JPEG nvJPEG does not take (CMYK), or one with an EXIF orientation (which
``decode_jpeg`` applies on the CPU only) is decoded in the worker instead (``load_rgb_tensor``) and handed
over as pixels. A file whose bytes do not decode is left out and counted
as the host path counts it; in training its place in the batch goes to another image of the batch
(with its label), so every batch keeps its size.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from loaders.spec import JPEG_MARKER, DataConfig, load_rgb_tensor


class EncodedImage(NamedTuple):
    path: str
    data: torch.Tensor  # 1-D uint8: the file's bytes (a JPEG); or [3, H, W] uint8 pixels decoded on the host
    height: int
    width: int


def read_encoded(path: str) -> EncodedImage:
    """The file's bytes and displayed size from its header; pixels for what the device does not decode."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(path) as image:
        width, height = image.size
        # an EXIF-oriented JPEG goes the host way too: decode_jpeg applies the orientation on the CPU only
        plain_jpeg = (image.format == "JPEG" and image.mode in ("RGB", "L") and data.startswith(JPEG_MARKER)
                      and image.getexif().get(0x0112, 1) == 1)
    if not plain_jpeg:
        pixels = load_rgb_tensor(path)
        return EncodedImage(path, pixels, pixels.shape[1], pixels.shape[2])
    return EncodedImage(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width)


class CropDraw:
    """One view's crop box and flip, ``[top, left, height, width, flip, resize_h, resize_w]``, drawn as
    torchvision's transforms draw them (same calls of the worker's RNG, same order). ``resize_h/w``
    non-zero (evaluation): the whole image is first resized to that size, and the box is in it."""

    def __init__(self, cfg: DataConfig, augment: str):
        self.size, self.augment = cfg.image_size, augment
        self.scale, self.ratio, self.resize_ratio = tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.val_resize_ratio

    def __call__(self, image: EncodedImage) -> torch.Tensor:
        if self.augment == "center":
            return torch.tensor(self._centre(image.height, image.width))
        shape_only = torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, image.height, image.width)
        top, left, height, width = T.RandomResizedCrop.get_params(shape_only, self.scale, self.ratio)
        flip = int(torch.rand(1) < 0.5)
        return torch.tensor([top, left, height, width, flip, 0, 0])

    def _centre(self, height: int, width: int) -> list[int]:
        """``Resize(round(size / ratio))`` then ``CenterCrop(size)``, with torchvision's sizes and offsets."""
        resized_h, resized_w = TF._compute_resized_output_size((height, width), [round(self.size / self.resize_ratio)])
        top, left = int(round((resized_h - self.size) / 2.0)), int(round((resized_w - self.size) / 2.0))
        return [top, left, self.size, self.size, 0, resized_h, resized_w]


class DeviceDecode:
    """Decodes, crops, resizes and flips a batch of EncodedImages on ``device``."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device

    def __call__(self, images: Sequence[EncodedImage], boxes: torch.Tensor):
        """``boxes [V, B, 7]`` -> (per view ``[B', 3, size, size]`` uint8 on the device, B' the images
        that decoded; the batch positions of those that did not)."""
        decoded = self._decode([image.data for image in images])
        keep = [i for i, x in enumerate(decoded) if x is not None]
        failed = [i for i, x in enumerate(decoded) if x is None]
        boxes_list = boxes.tolist()  # a CPU tensor: no device read
        return [torch.stack([self._crop(decoded[i], view[i]) for i in keep]) for view in boxes_list] if keep \
            else None, failed

    def _decode(self, datas: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[Optional[torch.Tensor]] = [None] * len(datas)
        jpegs = [i for i, d in enumerate(datas) if d.dim() == 1]
        for i, d in enumerate(datas):
            if d.dim() == 3:  # decoded on the host
                out[i] = d.to(self.device, non_blocking=True)
        if not jpegs:
            return out
        try:  # one call for the batch: nvJPEG decodes it batched
            for i, x in zip(jpegs, decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB,
                                               device=self.device)):
                out[i] = x
        except RuntimeError:  # a file of the batch does not decode: find it, decode the others
            for i in jpegs:
                try:
                    out[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    out[i] = None
        return out

    def _crop(self, image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
        top, left, height, width, flip, resized_h, resized_w = box
        if resized_h:  # evaluation: resize the whole image, then cut the centre
            image = _resize(image, resized_h, resized_w)
        # a header that lies about the size: the box stays inside what was decoded
        top, left = min(top, image.shape[1] - 1), min(left, image.shape[2] - 1)
        height, width = min(height, image.shape[1] - top), min(width, image.shape[2] - left)
        x = _resize(image[:, top:top + height, left:left + width], self.size, self.size)
        return x.flip(-1) if flip else x


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[3, h, w]`` -> uint8 ``[3, height, width]``, bilinear with antialiasing (torchvision's tensor Resize)."""
    if image.shape[1:] == (height, width):
        return image
    x = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def fill_failed(views: list[torch.Tensor], labels: torch.Tensor, failed: list[int]):
    """A training batch keeps its size: the images that did not decode are replaced by others of the
    batch (cycling over the decoded ones), with their labels. ``views`` hold the decoded rows only."""
    if not failed:
        return views, labels
    batch, bad = labels.shape[0], set(failed)
    kept = [i for i in range(batch) if i not in bad]
    row = {i: r for r, i in enumerate(kept)}
    take = torch.tensor([row[j] if j in row else k % len(kept) for k, j in enumerate(range(batch))])
    return [v[take.to(v.device)] for v in views], labels[torch.tensor(kept)[take]]
