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
