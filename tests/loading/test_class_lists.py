"""One class list per dataset: decided from the training split's class folders (hidden and OS-metadata
entries left out), applied to every split and every folder backend; a split whose classes differ is
one line naming them, and only regular files are images (a FIFO would block the reader for ever)."""
import os
import shutil

import pytest
from PIL import Image

from conftest import colour_folder, identities
from loaders import DataConfig, LoaderError, LoaderRequest, build_loader

BACKENDS = ["torchvision", "dali"]


def _labels_by_image(backend, cfg, split):
    pytest.importorskip({"dali": "nvidia.dali"}.get(backend, "torch"))
    loader = build_loader(backend, cfg, LoaderRequest(split=split, batch_size=2, augment="center"))
    pairs = {}
    for views, labels in loader:
        pairs.update(zip(identities(views[0]), labels.tolist()))
    return pairs, loader


@pytest.fixture
def dataset(tmp_path):
    train = colour_folder(tmp_path / "train", [2, 2, 2])  # classes c0 c1 c2, images 0..5
    val = tmp_path / "val"
    shutil.copytree(train, val)
    return train, val


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_folders_and_metadata_files_are_not_classes_or_images(dataset, backend):
    train, val = dataset
    for junk in (".ipynb_checkpoints", "__MACOSX"):
        (train / junk).mkdir()
        shutil.copy(train / "c0" / "0.jpg", train / junk / "0.jpg")
    (train / "c1" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    os.mkfifo(train / "c2" / "blocking.jpg")
    cfg = DataConfig(train=train, val=val, image_size=16, val_resize_ratio=1.0, num_workers=1)
    pairs, loader = _labels_by_image(backend, cfg, "train")
    assert loader.classes == ["c0", "c1", "c2"] and not loader.skipped
    assert pairs == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_split_is_numbered_by_the_training_classes(dataset, backend):
    train, val = dataset
    (train / "c3").mkdir()  # a class the validation split must have too
    Image.new("RGB", (40, 52), (210, 210, 210)).save(train / "c3" / "0.jpg")
    cfg = DataConfig(train=train, val=val, image_size=16, val_resize_ratio=1.0, num_workers=1)
    pytest.importorskip({"dali": "nvidia.dali"}.get(backend, "torch"))
    with pytest.raises(LoaderError, match=r"data.val: .* other class folders than the training split: missing c3"):
        build_loader(backend, cfg, LoaderRequest(split="val", batch_size=2, augment="center"))
    shutil.rmtree(train / "c3")
    shutil.move(val / "c1", val / "c9")  # renamed: c1 missing, c9 extra
    with pytest.raises(LoaderError, match="missing c1; extra c9"):
        build_loader(backend, cfg, LoaderRequest(split="val", batch_size=2, augment="center"))
    shutil.move(val / "c9", val / "c1")
    (train / ".DS_Store").write_bytes(b"\x00")  # metadata beside the classes changes nothing
    pairs, _ = _labels_by_image(backend, cfg, "val")
    assert pairs == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
