"""`python -m fasttrain.selftest`: every CPU path passes here and every GPU branch is reported as
skipped with its reason; a broken backend fails the command, naming that backend."""
import json

import pytest

from fasttrain import selftest


@pytest.mark.slow
def test_quick_selftest_passes_on_this_cpu_and_skips_the_gpu_paths(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    assert selftest.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] and report["environment"]["device"] == "cpu"
    rows = {r["path"]: r for r in report["paths"]}
    for backend in ("torchvision", "dali", "ffcv"):  # all three are installed by scripts/bootstrap.sh
        for method in ("selfcon", "supcon"):
            row = rows[f"{backend}/fp32/eager/{method}"]
            assert row["status"] == "ok", row
            assert row["last_loss"] < row["first_loss"] and row["images_per_second"] > 0
            assert isinstance(row["peak_memory_bytes"], int) and row["memory_kind"]
            assert row["val_labels"] == rows["torchvision/fp32/eager/selfcon"]["val_labels"]
    assert all(rows[name]["status"] == "skipped: no CUDA device" for name in selftest.GPU_ONLY)
    assert "every path this device supports passed" in capsys.readouterr().out


def test_a_broken_backend_fails_the_selftest_naming_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nvidia.dali")
    import loaders.dali_loader

    def broken(cfg, req):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(loaders.dali_loader, "build", broken)
    monkeypatch.setattr(selftest, "BACKENDS", ("torchvision", "dali"))
    monkeypatch.setattr(selftest, "METHODS", ("selfcon",))
    out = tmp_path / "selftest.json"
    assert selftest.main(["--quick", "--device", "cpu", "--out", str(out)]) == 1
    rows = {r["path"]: r for r in json.loads(out.read_text())["paths"]}
    assert rows["torchvision/fp32/eager/selfcon"]["status"] == "ok"
    assert rows["dali/fp32/eager/selfcon"]["status"].startswith("failed: RuntimeError: decoder exploded")
    printed = capsys.readouterr().out
    assert "| dali/fp32/eager/selfcon | failed: RuntimeError: decoder exploded" in printed
    assert "1 of" in printed and "paths failed" in printed


@pytest.mark.slow(minutes=1.5)
def test_the_selftest_runs_across_two_processes(tmp_path):
    from test_run import launch
    out = tmp_path / "selftest.json"
    launch("-m", "fasttrain.selftest", "--quick", "--device", "cpu", "--out", out, num_processes=2)
    rows = json.loads(out.read_text())["paths"]
    assert [r["status"] for r in rows if "/" in r["path"]] == ["ok"] * 6  # labels gathered and equal across backends


def test_a_gpu_plan_also_checks_dali_decoding_on_the_cpu_for_the_gpu():
    import torch

    names = [c.name for c in selftest.plan(torch.device("cuda"), quick=True)]
    assert {"dali(cpu decode)/fp32/eager/selfcon", "dali(cpu decode)/fp32/eager/supcon"} <= set(names)
    assert "dali/fp16/eager/selfcon" in names  # nvJPEG and every precision the GPU has
    assert not any("cpu decode" in c.name for c in selftest.plan(torch.device("cpu"), quick=True))
