"""Where a step's time goes: every part is found, counted once, and the trainer writes its profile."""
import gzip
import json
import logging

import pytest
import torch

from conftest import make_image_folder
from fasttrain.engine.profiling import PARTS, StepProfiler, mark, model_parts, parts_table, timed
from fasttrain.methods import Objective, get_method
from fasttrain.models import build_encoder


def _profile(tmp_path, method: str, steps: int = 2):
    torch.manual_seed(0)
    m = get_method(method)
    model = build_encoder("resnet18", stem="cifar", exits=["layer2"] if m.uses_subnetwork else [], width=8,
                          proj_dim=8)
    objective = Objective(m)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [((torch.randn(8, 3, 16, 16),) * m.num_views, torch.arange(8) % 4) for _ in range(steps + 1)]
    profiler = StepProfiler(torch.device("cpu"), tmp_path, skip=1, steps=steps, model=model)
    with profiler:
        for views, labels in timed(batches):
            loss, _ = objective(model, views, labels)
            with mark("backward"):
                loss.backward()
            with mark("optimizer"):
                optimizer.step()
                optimizer.zero_grad()
            profiler.step()
    return profiler, model


def test_every_part_of_a_selfcon_step_is_found_and_counted_once(tmp_path, one_thread):
    profiler, model = _profile(tmp_path, "selfcon")
    parts = profiler.parts
    assert profiler.profiled_steps == 2 and list(parts)[: len(PARTS) + 1] == ["step", *PARTS]
    for part in ("data", "forward", "trunk", "subnetworks", "heads", "loss", "backward", "optimizer"):
        assert parts[part] > 0, part
    assert parts["gather"] == 0  # one process: nothing to gather
    # exclusive attribution: the parts add up to the step, never more
    assert sum(parts[p] for p in PARTS if p != "other") <= parts["step"] * 1.001
    assert parts["trunk"] > parts["subnetworks"]  # the fc sub-network is a pool and a Linear
    # the backward of each forward part, found by its autograd node's sequence number
    by_part = parts["backward_by_part"]
    assert by_part["trunk"] > by_part.get("subnetworks", 0) > 0 and by_part["heads"] > 0
    assert sum(by_part.values()) == pytest.approx(parts["backward"])
    # the hooks are gone once the window is over
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with gzip.open(profiler.trace, "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"fasttrain/trunk", "fasttrain/subnetworks", "fasttrain/backward", "fasttrain/data"} <= names


def test_a_method_without_subnetwork_has_no_subnetwork_time(tmp_path, one_thread):
    parts = _profile(tmp_path, "supcon")[0].parts
    assert parts["subnetworks"] == 0 and parts["trunk"] > 0 and "subnetworks" not in parts["backward_by_part"]
    table = parts_table([{"method": "supcon", "parts": parts}], "method")
    assert table.startswith("| method | step [ms] | data |") and "| supcon |" in table and "of trunk" in table


def test_model_parts_hooks_are_removed_even_after_an_error():
    model = build_encoder("resnet18", stem="cifar", exits=["layer2"], width=8, proj_dim=8)
    with pytest.raises(RuntimeError):
        with model_parts(model):
            assert model.layer1._forward_pre_hooks
            raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("profile") / "train", classes=2, per_class=12, size=(24, 20))


def _recipe(tmp_path, folder, **profile):
    from fasttrain.recipe import load_recipe
    import yaml

    path = tmp_path / "recipe.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "method": "selfcon", "model": {"arch": "resnet18", "stem": "cifar", "width": 8, "proj_dim": 8},
        "data": {"train": str(folder), "image_size": 16, "num_workers": 0},
        "train": {"batch_size": 4, "precision": "fp32"}, "schedule": {"epochs": 1, "warmup_epochs": 0},
        "linear_eval": {"enabled": False}, "monitor": {"knn_every": 0, "profile": profile},
        "run": {"dir": str(tmp_path / "run"), "trackers": []}}))
    return load_recipe(path)


def test_the_trainer_writes_where_its_steps_time_goes(tmp_path, folder, one_thread, capsys):
    from fasttrain.run import run

    results = run(_recipe(tmp_path, folder, skip=2, steps=3))
    out = tmp_path / "run" / "profile"
    report = json.loads((out / "profile.json").read_text())
    assert report["steps"] == 3 and report["loader"] == "torchvision" and report["method"] == "selfcon"
    parts = report["parts_ms_per_step"]
    assert parts["data"] > 0 and parts["trunk"] > 0 and parts["subnetworks"] > 0 and parts["backward"] > 0
    assert (out / "trace.pt.trace.json.gz").stat().st_size > 0
    assert "| selfcon |" in (out / "profile.md").read_text()
    assert "where a step's time goes" in capsys.readouterr().out
    assert results["steps"] == 6  # profiling changed nothing about the run


def test_a_window_beyond_the_run_is_a_warning_not_a_failure(tmp_path, folder, one_thread, caplog):
    from fasttrain.run import run

    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        run(_recipe(tmp_path / "a", folder, skip=4, steps=10))  # 6 steps: steps 5 and 6 are profiled
    assert "monitor.profile: the run ended before step 14: 2 of the 10 steps asked for were profiled" in caplog.text
    assert json.loads((tmp_path / "a" / "run" / "profile" / "profile.json").read_text())["steps"] == 2
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        run(_recipe(tmp_path / "b", folder, skip=6, steps=1))
    assert "monitor.profile: the run ended before step 7, where the profiled window starts" in caplog.text
    assert not (tmp_path / "b" / "run" / "profile").exists()


def test_idle_time_counts_only_what_no_busy_interval_covers():
    from fasttrain.engine.profiling import idle_time
    busy = [(2, 4), (3, 6), (10, 11)]  # overlapping kernels merge into (2, 6) and (10, 11)
    assert idle_time([(0, 8)], busy) == 4  # 0-2 and 6-8
    assert idle_time([(3, 5), (9, 12)], busy) == 2  # 9-10 and 11-12
    assert idle_time([(0, 1)], []) == 1
