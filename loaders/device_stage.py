"""The device stage: the colour half of an augmentation and the normalisation, batched on the training
device, so that the host only reads, decodes, crops and flips, and hands over uint8 (a quarter of the
bytes of float32).

Per image it draws what torchvision's transforms draw, with their semantics: ``RandomApply(ColorJitter(
brightness, contrast, saturation, hue), p=0.8)`` with the four adjustments in an order drawn per image,
``RandomGrayscale(p=0.2)``, and for SimCLR ``RandomApply(GaussianBlur(k, sigma ~ U(0.1, 2)), p=0.5)``;
then ``Normalize``. Written here because torchvision's functional ops take one factor per call (a
Python loop over the batch) and apply the four adjustments in one order per call; the formulas are
torchvision's (``tests/test_device_stage.py`` compares them image by image). A few kernels per batch,
no host read: the parameters are drawn on the device.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from loaders.spec import BLUR_P, BLUR_SIGMA, COLOUR_STRENGTH, DataConfig, LoaderRequest, blur_kernel

_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
JITTER_P, GREY_P = 0.8, 0.2
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


class ColourParams(NamedTuple):
    """What one batch draws, per image: the four jitter factors, their order, and the coin flips."""
    factors: torch.Tensor  # [B, 4] brightness, contrast, saturation (multipliers) and hue (shift)
    order: torch.Tensor  # [B, 4] a permutation of the four adjustments
    jitter: torch.Tensor  # [B] bool: ColorJitter applied
    grey: torch.Tensor  # [B] bool: RandomGrayscale applied
    blur: torch.Tensor  # [B] bool: GaussianBlur applied (SimCLR)
    sigma: torch.Tensor  # [B] the blur's standard deviation


class DeviceColour:
    """``augment`` ("contrastive", "simclr"; anything else: normalisation only) for images of ``size``."""

    def __init__(self, augment: str, size: int, mean: Sequence[float], std: Sequence[float]):
        self.strength = COLOUR_STRENGTH.get(augment)
        self.kernel = blur_kernel(size) if augment == "simclr" else 1
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants: dict = {}

    def constants(self, device) -> dict:
        """mean, std and the jitter ranges as tensors on ``device``, made once: a tensor made from Python
        values on a GPU is a copy from pageable memory, which waits for the device."""
        if device not in self._constants:
            b, c, s, h = self.strength or (0, 0, 0, 0)
            made = {"mean": self.mean, "std": self.std, "low": (max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h),
                    "high": (1 + b, 1 + c, 1 + s, h)}
            self._constants[device] = {k: torch.tensor(v, device=device) for k, v in made.items()}
        return self._constants[device]

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` on the device -> float32, augmented and normalised, same layout."""
        x = images.float().div_(255)
        if self.strength is not None:
            x = self.apply(x, self.draw(x.shape[0], x.device, generator))
        constants = self.constants(x.device)
        return x.sub_(constants["mean"].view(1, 3, 1, 1)).div_(constants["std"].view(1, 3, 1, 1))

    def draw(self, batch: int, device, generator: Optional[torch.Generator] = None) -> ColourParams:
        low, high = self.constants(device)["low"], self.constants(device)["high"]

        def uniform(*shape):
            return torch.rand(*shape, device=device, generator=generator)

        factors = low + (high - low) * uniform(batch, 4)
        order = uniform(batch, 4).argsort(dim=1)  # a uniform random permutation per image
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * uniform(batch)
        blur = uniform(batch) < BLUR_P if self.kernel > 1 else torch.zeros(batch, dtype=torch.bool, device=device)
        return ColourParams(factors, order, uniform(batch) < JITTER_P, uniform(batch) < GREY_P, blur, sigma)

    def apply(self, x: torch.Tensor, p: ColourParams) -> torch.Tensor:
        """Float images in [0, 1] with the drawn parameters (jitter, then grayscale, then blur)."""
        column = p.factors.view(-1, 4, 1, 1, 1)
        for slot in range(4):  # every image applies the adjustment its order puts in this slot
            for kind, adjust in enumerate((_brightness, _contrast, _saturation, _hue)):
                chosen = (p.order[:, slot] == kind) & p.jitter
                x = torch.where(chosen.view(-1, 1, 1, 1), adjust(x, column[:, kind]), x)
        x = torch.where(p.grey.view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
        if self.kernel > 1:
            x = torch.where(p.blur.view(-1, 1, 1, 1), _gaussian_blur(x, self.kernel, p.sigma), x)
        return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def _contrast(x, factor):
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x, factor):
    return _blend(x, _grey(x), factor)


def _hue(x, shift):
    """torchvision's adjust_hue: through HSV, the hue rotated by ``shift`` turns."""
    h, s, v = _rgb_to_hsv(x).unbind(1)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=1))


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    top, bottom = x.max(dim=1).values, x.min(dim=1).values
    flat = top == bottom
    spread = top - bottom
    ones = torch.ones_like(top)
    s = spread / torch.where(flat, ones, top)
    divisor = torch.where(flat, ones, spread)
    rc, gc, bc = (top - r) / divisor, (top - g) / divisor, (top - b) / divisor
    hr = (top == r) * (bc - gc)
    hg = ((top == g) & (top != r)) * (2.0 + rc - bc)
    hb = ((top != g) & (top != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, top), dim=1)


def _hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = (sector.unsqueeze(1) == torch.arange(6, device=x.device).view(-1, 1, 1)).to(x.dtype)  # [B, 6, H, W]
    table = torch.stack((torch.stack((v, q, p, p, t, v), dim=1), torch.stack((t, v, v, q, p, p), dim=1),
                         torch.stack((p, p, t, v, v, q), dim=1)), dim=1)  # [B, 3 channels, 6 sectors, H, W]
    return torch.einsum("bshw,bcshw->bchw", mask, table)


def _gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's gaussian_blur (separable, reflect padding), a sigma per image: one grouped conv per axis."""
    batch, channels, height, width = x.shape
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, k]
    half = kernel // 2
    flat = F.pad(x.reshape(1, batch * channels, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, weights.view(-1, 1, 1, kernel), groups=batch * channels)
    flat = F.conv2d(flat, weights.view(-1, 1, kernel, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def device_stages(cfg: DataConfig, req: LoaderRequest, augments: Sequence[str]) -> Optional[list[DeviceColour]]:
    """One DeviceColour per view (of ``augments``) when the colour runs on the device: data.colour_stage
    device, or auto on a GPU, or JPEGs decoded on the device; else None (the host colours and
    normalises). The padded-crop views keep their host pipeline (Cutout sits between the colour and
    the normalisation)."""
    on_device = cfg.decode == "device" or cfg.colour_stage == "device" or (
        cfg.colour_stage == "auto" and req.device.type == "cuda")
    if not on_device or any(a.startswith("padcrop") for a in augments):
        return None
    return [DeviceColour(a, cfg.image_size, cfg.mean, cfg.std) for a in augments]


__all__ = ["ColourParams", "DeviceColour", "device_stages"]

