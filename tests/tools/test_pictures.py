"""``fasttrain.analysis.pictures``: Grad-CAM per exit and a 2-D embedding of every exit, from a tiny
checkpoint made here (random weights: the pictures must be drawn, not be good)."""
import json

import numpy as np
import pytest
import torch
import torchcam  # noqa: F401  (the analysis extra: a missing install fails here, never skips)
from PIL import Image

from conftest import REPO, make_image_folder
from fasttrain.analysis import pictures
from fasttrain.engine import checkpoint
from fasttrain.engine.trainer import build_model
from fasttrain.methods import get_method
from fasttrain.models import MultiExitResNet
from fasttrain.recipe import load_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A width-8 SelfCon checkpoint whose sub-network has conv stages of its own (``small``)."""
    root = tmp_path_factory.mktemp("pictures")
    data = root / "data"
    make_image_folder(data / "train", classes=3, per_class=2, size=(20, 20))
    make_image_folder(data / "val", classes=3, per_class=4, size=(20, 20), seed=1)
    recipe = load_recipe(REPO / "recipes" / "demo_selfcon.yaml", [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run.dir={root / 'run'}", "data.image_size=16",
        "model.width=8", "model.exit_kind=small", "model.proj_dim=16", "train.channels_last=false"])
    torch.manual_seed(0)
    model = build_model(recipe, get_method("selfcon"), None)
    path = root / "run" / checkpoint.CHECKPOINT
    checkpoint.atomic_save({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json"),
                            "method": "selfcon", "arch": "resnet18", "epoch": 1, "updates": 1}, path)
    return path


def tiny_model(exit_kind: str) -> MultiExitResNet:
    torch.manual_seed(0)
    return MultiExitResNet("resnet18", stem="cifar", exits=("layer2",), exit_kind=exit_kind, width=8,
                           proj_dim=16).eval()


def test_the_cli_draws_both_pictures_and_scores_every_exit(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert pictures.main([str(tiny_checkpoint), "--images", "3", "--embed-images", "12", "--out", str(out)]) == 0

    cam_png = np.asarray(Image.open(out / "gradcam.png").convert("RGB")).astype(float)
    columns, rows = 3, 3  # the image, sub0, backbone; one row per image
    cell = int(pictures.CELL * pictures.DPI)
    assert cam_png.shape[:2] == (round((pictures.CELL * rows + pictures.HEADER) * pictures.DPI), columns * cell)
    assert cam_png.std() > 20
    sub0, backbone = cam_png[:, cell:2 * cell], cam_png[:, 2 * cell:]
    assert np.abs(sub0 - backbone).mean() > 5  # the two exits' overlays are not the same picture

    embedding_png = np.asarray(Image.open(out / "embedding.png").convert("RGB")).astype(float)
    width = round((pictures.PANEL * 2 + pictures.LEGEND) * pictures.DPI)
    assert embedding_png.shape[:2] == (round((pictures.PANEL + 0.5) * pictures.DPI), width)
    assert embedding_png.std() > 20

    report = json.loads((out / "pictures.json").read_text())
    assert report["exits"] == ["sub0", "backbone"]
    assert set(report["embedding"]["separation"]) == {"sub0", "backbone"}
    assert all(0 <= s["knn5_loo_top1"] <= 100 for s in report["embedding"]["separation"].values())
    assert report["gradcam"]["layers"] == {"sub0": "subnetworks.layer2.1", "backbone": "layer4"}
    assert report["gradcam"]["target"] == "class-mean" and report["embedding"]["images"] == 12
    assert sorted(i["label"] for i in report["gradcam"]["images"]) == [0, 1, 2]  # one of each class
    assert "| sub0 |" in (out / "pictures.md").read_text()
    assert "sub0" in capsys.readouterr().out


@pytest.mark.parametrize("exit_kind, sub0_layer", [("fc", "layer2"), ("small", "subnetworks.layer2.1"),
                                                   ("sepconv", "subnetworks.layer2.1")])
def test_each_exit_is_mapped_at_the_last_conv_map_of_its_own_path(exit_kind, sub0_layer):
    model = tiny_model(exit_kind)
    assert [pictures.cam_layer(model, e) for e in range(2)] == [sub0_layer, "layer4"]
    assert [pictures.cam_layer(model, e, "shared") for e in range(2)] == ["layer2", "layer2"]
    assert pictures.cam_layer(MultiExitResNet("resnet18", exits=(), width=8), 0) == "layer4"


@pytest.mark.parametrize("exit_kind", ["fc", "small"])
def test_cam_maps_are_normalised_at_the_input_size_and_differ_between_exits(exit_kind):
    model = tiny_model(exit_kind)
    images, labels = torch.randn(6, 3, 24, 24), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        output = model(images)
    score = pictures.exit_scores(model, "class-mean", labels, output.features, output.projections, labels)
    cams = pictures.grad_cams(model, images, [pictures.cam_layer(model, e) for e in range(2)], score)
    assert cams.shape == (2, 6, 24, 24)
    assert cams.min() >= 0 and cams.max() <= 1
    assert (cams.amax(dim=(2, 3)) == 1).all() and (cams.flatten(2).std(2) > 0.05).all()  # none constant
    assert (cams[0] - cams[1]).abs().mean() > 0.05


@pytest.mark.parametrize("target", ["projection", "logit"])
def test_the_other_targets_score_every_exit(target):
    torch.manual_seed(0)
    model = MultiExitResNet("resnet18", stem="cifar", exits=("layer2",), width=8, proj_dim=16, num_classes=3,
                            exit_classifiers=True).eval()
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        output = model(images)
    score = pictures.exit_scores(model, target, labels, output.features, output.projections, labels)
    assert [score(output, e).shape for e in range(2)] == [(6,), (6,)]
    cams = pictures.grad_cams(model, images, [pictures.cam_layer(model, e) for e in range(2)], score)
    assert cams.shape == (2, 6, 16, 16) and cams.min() >= 0 and cams.max() <= 1


def test_knn_leave_one_out_sees_separated_classes_and_not_noise():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(10)
    centres = torch.eye(8)[:4] * 10
    assert pictures.knn_loo_top1(centres[labels] + torch.randn(40, 8), labels) == 100.0
    assert pictures.knn_loo_top1(torch.randn(40, 8), labels) < 60


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert pictures.main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such checkpoint" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("flags, says", [(["--method", "pca"], "--method"), (["--split", "test"], "--split"),
                                         (["--target", "logit"], "classifier on every exit")])
def test_bad_flags_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, flags, says):
    assert pictures.main([str(tiny_checkpoint), *flags, "--embed-images", "6", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_umap_without_umap_learn_says_how_to_install_it(tiny_checkpoint, tmp_path, capsys):
    try:
        import umap  # noqa: F401
        pytest.skip("umap-learn is installed")
    except ImportError:
        pass
    assert pictures.main([str(tiny_checkpoint), "--method", "umap", "--out", str(tmp_path)]) == 2
    assert "pip install umap-learn" in capsys.readouterr().err
