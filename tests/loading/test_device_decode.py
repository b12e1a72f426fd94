"""data.decode: device: the workers read bytes and draw crops, the device decodes, crops, resizes and
flips. Checked here on the CPU device (decode_jpeg's own CPU path; nvJPEG awaits the GPU kit)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from loaders import DataConfig, LoaderRequest, build_loader
from loaders.device_decode import fill_failed

ONE_LEVEL = 1.01 / 255 / 0.225  # one grey level after normalisation (the smallest std)


def load(root, decode, split="val", augment="center", batch_size=8, views=1, **cfg):
    cfg = DataConfig(train=root, val=root, image_size=32, num_workers=0, decode=decode, colour_stage="device", **cfg)
    torch.manual_seed(0)
    augments = augment if views == 1 else (augment,) * views
    loader = build_loader("torchvision", cfg, LoaderRequest(split=split, batch_size=batch_size, num_views=views,
                                                            augment=augments, seed=0))
    loader.set_epoch(0)
    return loader, list(loader)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("decode") / "images", classes=3, per_class=8, size=(64, 48))


@pytest.mark.parametrize("split,augment", [("val", "center"), ("train", "basic")])
def test_device_decoding_gives_the_host_paths_images_within_one_grey_level(folder, split, augment):
    _, host = load(folder, "host", split, augment)
    _, device = load(folder, "device", split, augment)
    assert len(host) == len(device) == 3
    for (h, host_labels), (d, device_labels) in zip(host, device):
        assert torch.equal(host_labels, device_labels) and h[0].shape == d[0].shape == (8, 3, 32, 32)
        assert (h[0] - d[0]).abs().max() <= ONE_LEVEL  # the same crops and flips, drawn alike
        assert d[0].dtype == torch.float32


def test_two_views_are_two_crops_with_colour_on_the_device(folder):
    _, batches = load(folder, "device", "train", "contrastive", views=2)
    (first, second), labels = batches[0]
    assert first.shape == second.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert (first - second).abs().mean() > 0.1


def write_jpeg(path, pixels, **kw):
    Image.fromarray(pixels).save(path, "JPEG", quality=95, **kw)


def test_exif_rotation_cmyk_and_png_decode_as_the_host_does(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 48 x 64 blocks
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 64 high, 48 wide
    write_jpeg(tmp_path / "c0" / "rotated.jpg", pixels, exif=exif.tobytes())
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "c0" / "cmyk.jpg", "JPEG", quality=95)
    Image.fromarray(pixels).save(tmp_path / "c1" / "plain.png")
    write_jpeg(tmp_path / "c1" / "plain.jpg", pixels)
    from loaders.device_decode import read_encoded
    # on a GPU decode_jpeg ignores EXIF orientation: an oriented JPEG, like CMYK and PNG, crosses as pixels
    assert [read_encoded(str(p)).data.dim() for p in sorted(tmp_path.rglob("*.*"))] == [3, 3, 1, 3]
    (host, host_labels), = load(tmp_path, "host", batch_size=4)[1]
    (device, device_labels), = load(tmp_path, "device", batch_size=4)[1]
    assert torch.equal(host_labels, device_labels)
    assert (host[0] - device[0]).abs().amax(dim=(1, 2, 3)).max() <= 2 * ONE_LEVEL  # CMYK: two JPEG round trips


def broken_folder(root, folder):
    """``folder``'s images plus, in class 1, a JPEG whose header reads but whose data does not decode."""
    good = (folder / "class_01" / "img_000.jpg").read_bytes()
    (root / "class_01").mkdir(parents=True)
    for c in ("class_00", "class_01", "class_02"):
        (root / c).mkdir(exist_ok=True)
        for p in (folder / c).iterdir():
            (root / c / p.name).write_bytes(p.read_bytes())
    (root / "class_01" / "img_zz_broken.jpg").write_bytes(good[:400] + bytes(3000))
    return root


def test_bytes_that_do_not_decode_are_skipped_and_counted_and_training_batches_keep_their_size(folder, tmp_path,
                                                                                                 caplog):
    root = broken_folder(tmp_path / "broken", folder)
    loader, batches = load(root, "device", batch_size=25)  # evaluation: every image once, the broken one left out
    labels = torch.cat([b[1] for b in batches])
    assert len(labels) == 24 and labels.bincount().tolist() == [8, 8, 8]
    assert loader.skipped == {str(root / "class_01" / "img_zz_broken.jpg")}
    loader, batches = load(root, "device", split="train", augment="basic", batch_size=25)
    (views, labels), = batches
    assert views[0].shape[0] == labels.shape[0] == 25 and len(loader.skipped) == 1
    assert sum("img_zz_broken.jpg" in r.getMessage() for r in caplog.records) == 2  # once per loader


def test_a_training_batch_where_nothing_decodes_is_an_error_not_a_skipped_step(folder, tmp_path):
    from loaders import LoaderError

    good = (folder / "class_00" / "img_000.jpg").read_bytes()
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):  # headers that read, data that does not decode
            (tmp_path / c / f"{i}.jpg").write_bytes(good[:400] + bytes(3000))
    with pytest.raises(LoaderError, match="no image of a batch decodes"):
        load(tmp_path, "device", split="train", augment="basic", batch_size=2)  # other processes would wait


def test_a_box_beyond_the_decoded_image_is_kept_inside_it():
    from loaders.device_decode import DeviceDecode

    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    crop = DeviceDecode(8, torch.device("cpu"))._crop(image, [25, 40, 10, 10, 0, 0, 0])  # a header that lied
    assert crop.shape == (3, 8, 8) and crop.dtype == torch.uint8
    assert torch.equal(crop, image[:, 19:20, 29:30].expand(3, 8, 8))  # the last pixel, resized


def test_a_failed_image_is_replaced_by_another_of_the_batch_with_its_label():
    decoded = [torch.tensor([10, 30, 40])]  # rows of positions 0, 2, 3 of a batch of 4 (1 failed)
    views, labels = fill_failed(decoded, torch.tensor([0, 1, 2, 3]), failed=[1])
    assert views[0].tolist() == [10, 30, 30, 40] and labels.tolist() == [0, 2, 2, 3]
    rows = dict(zip(views[0].tolist(), labels.tolist()))
    assert rows == {10: 0, 30: 2, 40: 3}  # every image keeps its own label


@pytest.mark.parametrize("override,message", [
    (["loader=dali"], "data.decode=device: read only by loader=torchvision"),
    (["data.colour_stage=host"], "data.colour_stage=host cannot apply"),
    (["method=cds", "data.view_augments=[padcrop_cutout,padcrop_contrastive]", "model.exit_kind=sepconv"],
     "does not make the padcrop_contrastive, padcrop_cutout augmentation"),
])
def test_the_recipe_refuses_what_device_decoding_cannot_make(tmp_path, override, message):
    from fasttrain.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: selfcon\nloader: torchvision\ndata: {{train: {tmp_path}, val: {tmp_path}, "
                      f"decode: device}}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, override)


def test_jpeg_bytes_cross_to_the_device_undecoded(folder):
    from loaders.device_decode import read_encoded

    path = str(folder / "class_00" / "img_000.jpg")
    encoded = read_encoded(path)
    assert encoded.data.dim() == 1 and bytes(encoded.data[:3].tolist()) == b"\xff\xd8\xff"
    assert (encoded.height, encoded.width) == (48, 64)
    assert encoded.data.numel() == len(open(path, "rb").read()) < 48 * 64 * 3
    assert Image.open(io.BytesIO(bytes(encoded.data.tolist()))).size == (64, 48)
