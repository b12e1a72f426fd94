"""The demo's real-image datasets: made from what is on the disk, balanced, atomic, made once."""
from PIL import Image

from fasttrain import demo_data


def test_digits_are_split_per_class_and_written_once(tmp_path):
    out = tmp_path / "digits"
    summary = demo_data.build("digits", out)
    assert summary["images"] == {"train": 1352, "val": 445} and len(summary["classes"]) == 10
    train = sorted(out.glob("train/*/*.jpg"))
    assert len(train) == 1352 and len(list(out.glob("val/*/*.jpg"))) == 445
    assert {p.parent.name for p in train} == set(summary["classes"])
    with Image.open(train[0]) as image:
        assert image.size == (28, 28) and image.mode == "L"
    stamp = train[0].stat().st_mtime_ns
    demo_data.build("digits", out)  # same options: nothing is rewritten
    assert train[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".digits.tmp-*"))


def test_fashion_mnist_subset_is_class_balanced(tmp_path):
    summary = demo_data.build("fashion_mnist", tmp_path / "fm", train_per_class=3, val_per_class=2)
    assert summary["images"] == {"train": 30, "val": 20}
    assert all(len(list((tmp_path / "fm" / "train" / c).iterdir())) == 3 for c in summary["classes"])


def test_missing_source_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo_data.SOURCES, "fashion_mnist", lambda: demo_data.fashion_mnist(tmp_path / "nowhere"))
    assert demo_data.main(["fashion_mnist", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
    assert not (tmp_path / "out").exists()
