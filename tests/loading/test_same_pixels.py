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


def test_the_tensor_host_stage_decodes_the_pixels_pil_decodes(tmp_path):
    """``load_rgb_tensor`` (libjpeg-turbo through torchvision, the host stage when the colour runs on
    the device) gives ``load_rgb``'s pixels exactly: plain, greyscale, CMYK and EXIF-rotated JPEGs, a
    16-bit PNG; a truncated JPEG is unreadable in both."""
    from loaders.spec import load_rgb_tensor

    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "rgb.jpg", quality=90)
    Image.fromarray(photo[..., 0]).save(tmp_path / "grey.jpg", quality=90)
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    _rotated_jpeg(tmp_path / "rotated.jpg")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "grey16.png")
    for name in ("rgb.jpg", "grey.jpg", "cmyk.jpg", "rotated.jpg", "grey16.png"):
        pixels = load_rgb_tensor(str(tmp_path / name))
        assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3, name
        assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.asarray(load_rgb(str(tmp_path / name))))), name
    data = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(OSError, match="(?i)truncated"):
        load_rgb_tensor(str(tmp_path / "cut.jpg"))


def test_the_device_colour_host_stage_crops_as_the_pil_pipeline(tmp_path):
    """With the colour on the device the workers crop uint8 tensors (torchvision's tensor resize, the
    ceiling's): the evaluation crops match the PIL pipeline's within a few grey levels."""
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "images", classes=2, per_class=4, size=(90, 70))
    cfg = DataConfig(train=root, val=root, image_size=32, num_workers=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    req = LoaderRequest(split="val", batch_size=8, augment="center")
    pil, _ = next(iter(build_loader("torchvision", cfg, req)))
    tensor_loader = build_loader("torchvision", cfg.model_copy(update={"colour_stage": "device"}), req)
    assert tensor_loader.stages is not None
    tensor, _ = next(iter(tensor_loader))
    difference = (pil[0] - tensor[0]).abs() * 255
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())
