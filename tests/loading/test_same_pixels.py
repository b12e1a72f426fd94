"""The same file gives the same pixels from every backend: EXIF orientation applied, 16-bit and
palette images scaled, not clipped."""
import numpy as np
import pytest
import torch
from PIL import Image

from loaders import DataConfig, LoaderRequest, build_loader
from loaders.spec import load_rgb


def _rotated_jpeg(path):
    """Stored 40 wide x 20 high, left half red, right half blue, with EXIF orientation 6 (rotate 90°
    clockwise to view): seen upright it is 20 wide x 40 high, red on top, blue below."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (220, 20, 20)
    pixels[:, 20:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


def test_load_rgb_applies_orientation_and_scales_16_bit(tmp_path):
    _rotated_jpeg(tmp_path / "r.jpg")
    upright = np.asarray(load_rgb(str(tmp_path / "r.jpg")))
    assert upright.shape == (40, 20, 3)
    assert upright[5, 10, 0] > 180 and upright[35, 10, 2] > 180  # red on top, blue below
    grey16 = np.full((8, 8), 32768, np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "g.png")
    assert abs(int(np.asarray(load_rgb(str(tmp_path / "g.png")))[0, 0, 0]) - 128) <= 1
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    assert np.asarray(load_rgb(str(tmp_path / "p.png"))).shape == (4, 4, 3)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_every_backend_sees_an_exif_rotated_photo_upright(tmp_path, backend):
    pytest.importorskip({"dali": "nvidia.dali"}.get(backend, "torch"))
    (tmp_path / "c0").mkdir()
    _rotated_jpeg(tmp_path / "c0" / "r.jpg")
    cfg = DataConfig(train=tmp_path, val=tmp_path, image_size=20, val_resize_ratio=0.5, num_workers=1,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    views, _ = next(iter(build_loader(backend, cfg, LoaderRequest(split="val", batch_size=1, augment="center"))))
    image = views[0][0].float()  # 3 x 20 x 20 centre crop of the upright 20 x 40 image resized to 40 x 80
    top, bottom = image[:, :5].mean(dim=(1, 2)), image[:, -5:].mean(dim=(1, 2))
    assert top[0] > top[2] and bottom[2] > bottom[0], (top, bottom)
    assert torch.isfinite(image).all()
