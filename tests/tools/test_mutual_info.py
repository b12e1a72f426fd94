"""The MI estimators of ``fasttrain.analysis.mutual_info``: exact on hand-made score matrices, within their
known bias of the closed-form MI of correlated Gaussians, and the CLI on a tiny checkpoint."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_image_folder
from fasttrain.analysis.mutual_info import (ESTIMATORS, correlated_gaussians, donsker_varadhan, estimate, main,
                                            gaussian_mi, infonce, nwj)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaussian_mi_closed_form():
    assert gaussian_mi(1, 0.0) == 0
    assert gaussian_mi(8, 0.5) == pytest.approx(-4 * math.log(0.75))
    x, y = correlated_gaussians(20000, 3, 0.8, seed=1)
    cross = np.corrcoef(x.T.numpy(), y.T.numpy())[:3, 3:]  # corr(x_i, y_j): rho on the diagonal, 0 elsewhere
    assert np.allclose(cross, 0.8 * np.eye(3), atol=0.03)


def test_bounds_on_hand_made_score_matrices():
    n = 64
    separated = torch.eye(n) * 1000.0  # each positive pair far above its negatives: InfoNCE's ceiling
    assert infonce(separated).item() == pytest.approx(math.log(n), abs=1e-5)
    blind = torch.randn(n)[:, None].expand(n, n)  # a score of x alone says nothing about which y is its pair
    assert infonce(blind).item() == pytest.approx(0, abs=1e-5)
    constant = torch.full((n, n), 1.0)  # f = 1 is NWJ's optimum under independence; any constant is DV's
    assert nwj(constant).item() == pytest.approx(0, abs=1e-6)
    assert donsker_varadhan(torch.full((n, n), 3.7)).item() == pytest.approx(0, abs=1e-5)
    # the optimal critics of a known discrete joint: x = y uniform over k values, I = log k.
    k = 4
    labels = torch.arange(n) % k
    same = (labels[:, None] == labels[None]).float()
    log_ratio = same * math.log(k) + (1 - same) * -50.0  # log p(x,y)/p(x)p(y), -inf off the support
    # off-diagonal pairs share a value a little less often than independent ones: (n - k) / (n - 1) of 1/k
    marginal_mean_ratio = (n - k) / (n - 1)
    assert nwj(1 + log_ratio).item() == pytest.approx(math.log(k) + 1 - marginal_mean_ratio, abs=1e-5)
    assert donsker_varadhan(log_ratio).item() == pytest.approx(math.log(k) - math.log(marginal_mean_ratio), abs=1e-5)


# What the estimators reach on 10,000 pairs in dim 8 (70/10/20 split, batch 128, 1,000 steps, separable
# critic), measured over seeds 0-4 (the truth in brackets):
#   rho 0.2 (0.163): all three 0.107-0.158;   rho 0.5 (1.151): all three 1.006-1.116;
#   rho 0.8 (4.087): InfoNCE 3.33-3.43 (it saturates well below log 128 = 4.85), NWJ 3.36-3.66, MINE 3.40-3.63;
#   rho 0.9 (6.643): InfoNCE 4.41-4.47, NWJ 4.56-4.99, MINE 4.85-5.03 (not tested: only the ceiling is sure).
# The gaps below the truth (at most 0.06, 0.15, 0.76) get ~50% margin. All are lower bounds: more than the
# held-out sampling noise (a few 0.01 nats on 2,000 pairs) above the truth would be a bug.
BELOW_TRUTH = {0.2: 0.1, 0.5: 0.25, 0.8: 1.1}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_on_correlated_gaussians(estimator):
    estimates = {}
    for rho in (0.2, 0.5, 0.8):
        x, y = correlated_gaussians(10000, 8, rho, seed=0)
        result = estimate(x, y, estimator, steps=1000, batch_size=128, seed=0)
        truth, value = gaussian_mi(8, rho), result["estimate"]
        assert truth - BELOW_TRUTH[rho] < value < truth + 0.05, (rho, value, truth)
        estimates[rho] = value
        if estimator == "infonce":
            assert result["bound"] == pytest.approx(math.log(128)) and value <= result["bound"]
    assert estimates[0.2] < estimates[0.5] < estimates[0.8]


def test_infonce_is_capped_by_log_batch_and_concat_critic_works():
    x, y = correlated_gaussians(1500, 4, 0.99, seed=2)  # I = 7.8 nats, far above log 16
    result = estimate(x, y, "infonce", critic="concat", steps=600, batch_size=16, seed=0)
    assert result["bound"] == pytest.approx(math.log(16))
    assert math.log(16) - 0.3 < result["estimate"] <= math.log(16)  # measured 2.61 of 2.77 (1,500 steps: 2.72)
    independent = estimate(x, torch.randn(1500, 4, generator=torch.Generator().manual_seed(3)), "infonce",
                           critic="concat", steps=600, batch_size=16, seed=0)
    assert abs(independent["estimate"]) < 0.1


def test_estimate_is_reproducible_and_leaves_the_global_rng_alone():
    x, y = correlated_gaussians(600, 2, 0.5, seed=0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = estimate(x, y, "mine", steps=30, batch_size=32, seed=7)
    assert torch.rand(1) == before
    b = estimate(x, y, "mine", steps=30, batch_size=32, seed=7)
    assert a == b and a["heldout_pairs"] == 120 and a["train_pairs"] == 420


def tiny_checkpoint(tmp_path):
    """A random width-8 ResNet-18 SelfCon encoder saved as training would, on a folder of 48 tiny JPEGs."""
    from fasttrain.engine import checkpoint
    from fasttrain.engine.trainer import build_model
    from fasttrain.methods import get_method
    from fasttrain.recipe import load_recipe

    data = tmp_path / "data"
    make_image_folder(data / "train", classes=4, per_class=1, size=(12, 12))  # every split has the same classes
    make_image_folder(data / "val", classes=4, per_class=12, size=(12, 12), seed=1)
    run = tmp_path / "run"
    recipe = load_recipe(REPO / "recipes" / "demo_selfcon.yaml", [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run.dir={run}", "data.image_size=8",
        "model.width=8", "model.stem=cifar", "linear_eval.batch_size=16"])
    torch.manual_seed(0)  # the same untrained encoder whatever ran before in this process
    model = build_model(recipe, get_method("selfcon"), num_classes=None)
    checkpoint.atomic_save({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json"), "method": "selfcon",
                            "arch": "resnet18", "epoch": 0, "updates": 0}, run / checkpoint.CHECKPOINT)
    return run / checkpoint.CHECKPOINT


def test_a_unit_constant_on_the_training_pairs_is_zeroed_not_blown_up():
    from fasttrain.analysis.mutual_info import _standardise

    values = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0], [7.0, 2.5]])  # unit 1: dead on rows 0-2 only
    z = _standardise(values, torch.tensor([0, 1, 2]))
    assert torch.equal(z[:, 1], torch.zeros(4))  # not 2.5 / 1e-6
    assert torch.allclose(z[:3, 0], torch.tensor([-1.0, 0.0, 1.0])) and z[3, 0] == 2


def test_cli_on_a_checkpoint_writes_json_table_and_plot(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    assert main([str(ckpt), "--steps", "20", "--batch-size", "8"]) == 0
    out = ckpt.parent / "analysis"  # the default: beside the checkpoint
    report = json.loads((out / "mutual_info.json").read_text())
    assert report["checkpoint"]["exit"] == "layer2" and report["checkpoint"]["images"] == 48
    assert report["checkpoint"]["dims"] == {"F": 64, "T": 16}  # width 8: layer4 has 8 * 8, layer2 8 * 2 channels
    assert [r["estimator"] for r in report["results"]] == list(ESTIMATORS)
    for row in report["results"]:
        assert math.isfinite(row["estimate"]) and row["exit"] == "layer2" and row["checkpoint"] == str(ckpt)
        assert row["estimate"] > -1, row  # a lower bound of MI >= 0 on 9 held-out pairs, not -1e3 nats
        assert row["estimator"] != "infonce" or row["estimate"] <= math.log(8) + 1e-6
        assert row["heldout_pairs"] == 9  # 20% of 48
        assert row["bound"] == (pytest.approx(math.log(8)) if row["estimator"] == "infonce" else None)
    table = (out / "mutual_info.md").read_text()
    assert all(f"| {name} |" in table for name in ESTIMATORS)
    pixels = np.asarray(Image.open(out / "mutual_info.png").convert("L"), dtype=float)
    assert pixels.std() > 0
    assert "mutual_info.json" in capsys.readouterr().out


def test_cli_other_exit_and_gaussian_check_only(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    assert main([str(ckpt.parent), "--exit", "layer1", "--estimators", "nwj", "--steps", "5", "--batch-size", "8",
                "--out", str(tmp_path / "o1")]) == 0
    report = json.loads((tmp_path / "o1" / "mutual_info.json").read_text())
    assert report["checkpoint"]["exit"] == "layer1" and report["checkpoint"]["dims"]["T"] == 8
    assert main(["--gaussian-check", "--estimators", "infonce", "--steps", "10", "--batch-size", "16",
                "--out", str(tmp_path / "o2")]) == 0
    rows = json.loads((tmp_path / "o2" / "mutual_info.json").read_text())["gaussian_check"]
    assert [r["rho"] for r in rows] == [0.2, 0.5, 0.8, 0.9] and all("infonce" in r for r in rows)
    assert np.asarray(Image.open(tmp_path / "o2" / "mutual_info.png").convert("L"), dtype=float).std() > 0


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such checkpoint"),
    (["{ckpt}", "--exit", "layer4"], "--exit"),
    (["{ckpt}", "--estimators", "infonce,jsd"], "--estimators jsd"),
    ([], "nothing to do"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    ckpt = tiny_checkpoint(tmp_path) if "{ckpt}" in args else None
    args = [a.format(missing=tmp_path / "nope.pt", ckpt=ckpt) for a in args]
    assert main(args + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_module_run_as_a_command_reports_a_missing_checkpoint_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fasttrain.analysis.mutual_info", str(tmp_path / "nope.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"fasttrain.analysis.mutual_info: error: no such checkpoint: {tmp_path / 'nope.pt'}"
