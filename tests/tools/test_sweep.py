"""A sweep drives run.py once per value into its own run dir, continues where it stopped, and
refuses a bad value before anything runs."""
import json
import os

import pytest
import yaml
from PIL import Image

from fasttrain.analysis import sweep

from conftest import make_image_folder


@pytest.fixture
def recipe(tmp_path):
    make_image_folder(tmp_path / "data" / "train", classes=3, per_class=6, size=(24, 20))
    make_image_folder(tmp_path / "data" / "val", classes=3, per_class=2, size=(24, 20), seed=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "method": "selfcon", "model": {"arch": "resnet18", "stem": "cifar", "width": 8, "proj_dim": 16},
        "data": {"train": str(tmp_path / "data" / "train"), "val": str(tmp_path / "data" / "val"),
                 "image_size": 16, "num_workers": 0},
        "train": {"batch_size": 6, "precision": "fp32"}, "schedule": {"epochs": 1, "warmup_epochs": 0},
        "linear_eval": {"epochs": 1, "batch_size": 6}, "monitor": {"knn_every": 0},
        "run": {"dir": str(tmp_path / "run")}}))
    return path


def test_parse_values_keeps_lists_whole():
    assert sweep.parse_values("loss.alpha=0,0.5,1") == ("loss.alpha", ["0", "0.5", "1"])
    assert sweep.parse_values("model.exits=[layer1,layer2],[layer2]") == ("model.exits",
                                                                          ["[layer1,layer2]", "[layer2]"])
    for bad in ("loss.alpha", "loss.alpha=", "loss.alpha=1,,2", "loss.alpha=1,1"):
        with pytest.raises(Exception, match="--set"):
            sweep.parse_values(bad)


@pytest.mark.slow
def test_two_values_give_two_run_dirs_and_one_table_and_a_rerun_trains_nothing(recipe, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main([str(recipe), "--set", "loss.alpha=0,1", "--out", str(out)]) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["loss.alpha=0", "loss.alpha=1"]
    for name in runs:
        saved = yaml.safe_load((out / name / "recipe.yaml").read_text())
        assert saved["loss"]["alpha"] == float(name.split("=")[1]) and saved["run"]["dir"] == str(out / name)
    result = json.loads((out / "sweep.json").read_text())
    assert [r["value"] for r in result["runs"]] == ["0", "1"]
    assert all(set(r["top1"]) == {"sub0", "backbone", "ensemble"} for r in result["runs"])
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| loss.alpha | top-1 sub0") and len(table) == 4
    assert Image.open(out / "sweep.png").size == (660, 440)
    stamps = [os.stat(out / name / "results.json").st_mtime_ns for name in runs]
    capsys.readouterr()
    assert sweep.main([str(recipe), "--set", "loss.alpha=0,1", "--out", str(out)]) == 0
    assert "done before, kept" in capsys.readouterr().out
    assert stamps == [os.stat(out / name / "results.json").st_mtime_ns for name in runs]


def test_a_bad_value_is_one_line_before_any_run(recipe, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main([str(recipe), "--set", "loss.alpha=0.5,-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.alpha" in err[0] and not (out / "loss.alpha=0.5").exists()
    assert sweep.main([str(recipe), "loss.alpha=1", "--set", "loss.alpha=0,1", "--out", str(out)]) == 2
    assert "set by the sweep" in capsys.readouterr().err
