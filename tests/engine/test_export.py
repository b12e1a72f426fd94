"""A finished run's encoder loads strictly into torchvision's ResNet and computes the same thing."""
import re

import pytest
import torch
import torchvision
from torch import nn

from conftest import REPO, make_image_folder
from fasttrain.engine import checkpoint
from fasttrain.engine.trainer import build_model
from fasttrain.export import main as export_main
from fasttrain.methods import get_method
from fasttrain.recipe import load_recipe
from fasttrain.run import run


def torchvision_model(load_line: str) -> nn.Module:
    """Run the loading line the export printed, as a user would."""
    scope = {"torch": torch, "torchvision": torchvision}
    exec(load_line, scope)
    return scope["model"].eval()


def printed_load_line(capsys) -> str:
    out = capsys.readouterr().out
    return re.search(r"Load it with:\n  (.*)", out).group(1)


@pytest.mark.slow
def test_a_trained_selfcon_run_exports_backbone_and_linear_head(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(data / "train", classes=3, per_class=8, size=(24, 20))
    make_image_folder(data / "val", classes=3, per_class=3, size=(24, 20), seed=1)
    recipe = load_recipe(REPO / "recipes" / "demo_selfcon.yaml", [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run.dir={tmp_path / 'run'}", "data.image_size=16",
        "train.batch_size=8", "schedule.epochs=1", "linear_eval.epochs=2", "linear_eval.batch_size=8",
        "monitor.knn_every=0", "run.resume=never"])
    run(recipe)
    ckpt = tmp_path / "run" / checkpoint.CHECKPOINT
    assert export_main([str(ckpt), str(tmp_path / "resnet18.pt"), "--exits"]) == 0
    tv = torchvision_model(printed_load_line(capsys))  # conv1 3x3, no max-pool, with the linear head

    state = checkpoint.load(ckpt, "test")
    ours = build_model(checkpoint.recipe_of(state), get_method("selfcon"), None)
    checkpoint.load_weights(ours, state, "test")
    ours.eval()
    head = torch.load(tmp_path / "run" / checkpoint.LINEAR_CLASSIFIERS)["backbone"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        feature = ours(x, project=False).features[-1]
        assert torch.allclose(tv(x), feature @ head["weight"].T + head["bias"], atol=1e-5)
        tv.fc = nn.Identity()
        assert torch.allclose(tv(x), feature, atol=1e-5)
    exits = torch.load(tmp_path / "resnet18.exits.pt")
    assert exits["exits"] == ["layer2"] and any(k.startswith("subnetworks.layer2") for k in exits["state_dict"])


def test_a_ce_checkpoint_exports_its_classifier_into_the_stock_resnet(tmp_path, capsys):
    recipe = load_recipe(REPO / "recipes" / "r18_ce.yaml", [f"run.dir={tmp_path}"])
    model = build_model(recipe, get_method("ce"), num_classes=7).eval()
    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json"), "method": "ce",
                            "arch": "resnet18", "epoch": 1, "updates": 1}, ckpt)
    assert export_main([str(ckpt), str(tmp_path / "out.pt")]) == 0
    line = printed_load_line(capsys)
    assert line.startswith("model = torchvision.models.resnet18(num_classes=7); model.load_state_dict(")
    tv = torchvision_model(line)  # torchvision's own resnet18 (ImageNet stem), strict
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tv(x), model(x, project=False).logits, atol=1e-5)


def test_export_of_a_missing_or_foreign_file_is_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope.pt"), str(tmp_path / "out.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    assert export_main([str(tmp_path / "foreign.pt"), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a fasttrain checkpoint" in err and "\n" not in err and not (tmp_path / "out.pt").exists()
