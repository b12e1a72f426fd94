"""A run directory's history survives any stop, and belongs to one run at a time."""
import json
import subprocess
import sys

from conftest import REPO
from fasttrain.engine.metrics import MetricsFile


def test_a_resume_keeps_the_history_up_to_its_step_and_drops_a_torn_line(tmp_path, caplog):
    rows = [{"kind": "train", "epoch": 1, "step": s, "loss": 1.0 / s} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    metrics = MetricsFile(tmp_path, True, resume_step=3)
    assert [r["step"] for r in metrics.read()] == [1, 2, 3]
    assert "line 6 is not a JSON record" in caplog.text
    metrics.write({"kind": "train", "epoch": 1, "step": 4, "loss": 0.2})
    assert [r["step"] for r in metrics.read()] == [1, 2, 3, 4]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "kind,epoch,step,key,value" and len(csv_lines) == 5  # header + one loss per step
    assert not list(tmp_path.glob(".metrics*"))  # no temp file left


def test_a_second_run_on_a_held_run_dir_is_refused_in_one_line(tmp_path):
    from fasttrain.run import holding_run_dir
    run_dir = tmp_path / "run"
    with holding_run_dir(run_dir):
        proc = subprocess.run([sys.executable, "fasttrain/run.py", "recipes/demo_selfcon.yaml",
                               f"run.dir={run_dir}", f"data.train={tmp_path}", f"data.val={tmp_path}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"run.dir={run_dir}: another run (process" in proc.stderr
    with holding_run_dir(run_dir):  # released when the first block ended
        pass


def test_yaml_aliases_are_refused_in_one_line(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                      "c: [*b, *b, *b, *b, *b, *b, *b, *b]\nmethod: selfcon\n")
    proc = subprocess.run([sys.executable, "fasttrain/run.py", str(recipe)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"fasttrain: error: {recipe}:2: not valid YAML (the alias *a (recipes share "
                                   f"settings with base:, not YAML aliases))")


def test_a_resume_refuses_another_batch_or_dataset_unless_told(tmp_path):
    from conftest import make_image_folder
    from test_run import launch, write_recipe
    make_image_folder(tmp_path / "data" / "train", classes=3, per_class=8, size=(24, 20))
    make_image_folder(tmp_path / "data" / "val", classes=3, per_class=2, size=(24, 20), seed=1)
    recipe = write_recipe(tmp_path, tmp_path / "data", "supcon_s", train={"precision": "fp32"},
                          linear_eval={"enabled": False}, monitor={"knn_every": 0})
    launch("fasttrain/run.py", recipe, accelerate=False)
    state = __import__("fasttrain.engine.checkpoint", fromlist=["load"]).load(tmp_path / "run" / "checkpoint.pt", "t")
    assert state["classes"] == ["class_00", "class_01", "class_02"] and state["train_images"] == 24
    proc = launch("fasttrain/run.py", recipe, "schedule.epochs=2", "train.batch_size=4", accelerate=False,
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was trained with another setting: train.batch_size 8 -> 4; resume with the same settings, or set " \
           "run.resume_changes=true" in proc.stderr
    proc = launch("fasttrain/run.py", recipe, "schedule.epochs=2", "train.batch_size=4", "run.resume_changes=true",
                  accelerate=False)
    assert "accepted: run.resume_changes" in proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["classes"] == state["classes"]


def test_a_killed_loader_worker_is_one_line_naming_the_cure(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import torch.utils.data

    import loaders.torchvision_loader
    from conftest import make_image_folder
    from fasttrain.run import main
    from test_run import write_recipe
    make_image_folder(tmp_path / "data" / "train", classes=3, per_class=8, size=(24, 20))
    make_image_folder(tmp_path / "data" / "val", classes=3, per_class=2, size=(24, 20), seed=1)
    recipe = write_recipe(tmp_path, tmp_path / "data", "supcon_s", train={"precision": "fp32"},
                          data={"num_workers": 1}, linear_eval={"enabled": False}, monitor={"knn_every": 0})
    real = loaders.torchvision_loader.load_rgb

    def killed_in_a_worker(path):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
        return real(path)

    monkeypatch.setattr(loaders.torchvision_loader, "load_rgb", killed_in_a_worker)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main([str(recipe)]) == 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fasttrain: error: a data loader worker died (DataLoader worker (pid")
    assert "lower data.num_workers; the last checkpoint is intact" in err[-1]


def test_a_peers_death_is_described_and_a_bug_is_not():
    from fasttrain.faults import describe_crash
    assert "another process of this run stopped" in describe_crash(
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:6000"))
    assert describe_crash(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")) is None
