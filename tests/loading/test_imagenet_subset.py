"""ImageNet-100 (or any class list) as linked ImageFolders that every loader reads."""
from torchvision.datasets import ImageFolder

from conftest import make_image_folder
from loaders.imagenet_subset import IMAGENET100, main


def fake_imagenet(root, wnids, per_class=2):
    for split in ("train", "val"):
        make_image_folder(root / split, classes=len(wnids), per_class=per_class, size=(16, 16))
        for i, wnid in enumerate(wnids):
            (root / split / f"class_{i:02d}").rename(root / split / wnid)
    return root


def test_a_class_list_becomes_linked_folders_read_with_the_same_images(tmp_path, capsys):
    wnids = ["n01440764", "n01443537", "n01484850"]
    source = fake_imagenet(tmp_path / "imagenet", wnids)
    (tmp_path / "classes.txt").write_text("n01484850\nn01440764\n")
    assert main([str(source), str(tmp_path / "sub"), "--classes", str(tmp_path / "classes.txt")]) == 0
    for split in ("train", "val"):
        folder = ImageFolder(tmp_path / "sub" / split)
        assert folder.classes == ["n01440764", "n01484850"] and len(folder) == 4
        assert all((tmp_path / "sub" / split / c).is_symlink() for c in folder.classes)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_classes_or_an_existing_out_are_one_line(tmp_path, capsys):
    source = fake_imagenet(tmp_path / "imagenet", ["n01440764"])
    assert main([str(source), str(tmp_path / "sub")]) == 2  # imagenet100: 100 classes, 1 present
    err = capsys.readouterr().err.strip()
    assert "100 class folder(s) missing" in err and IMAGENET100[0] in err and "\n" not in err
    assert not (tmp_path / "sub").exists()
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text("n01440764\n")
    assert main([str(source), str(tmp_path / "sub"), "--classes", str(tmp_path / "one.txt")]) == 2
    assert "exists" in capsys.readouterr().err
