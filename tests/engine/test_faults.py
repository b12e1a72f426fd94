"""Bad input and faults, one test per class: stop signals (plain and through the launcher), temp
files, inputs checked before the first step, unreadable images in evaluation, the run dir, a full
disk, symlink loops, duplicate recipe keys, errors raised in loader workers, Ctrl-C at start-up."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_image_folder
from fasttrain.engine import checkpoint
from fasttrain.faults import Stopped, describe_os_error
from fasttrain.files import replacing, sweep_stale_temps
from test_run import ACCELERATE, ENV, FREE_PORT, PYTHON, launch, write_recipe

DEAD_PID = 999_999_999  # above any pid_max: never a running process


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "train", classes=3, per_class=8, size=(24, 20))
    make_image_folder(root / "val", classes=3, per_class=3, size=(24, 20), seed=1)
    return root


def long_run(tmp_path, data):
    """A run that would take minutes: it is stopped long before it ends."""
    return write_recipe(tmp_path, data, "supcon_s", schedule={"epochs": 500}, train={"precision": "fp32"},
                        linear_eval={"enabled": False}, monitor={"knn_every": 0})


def wait_for_steps(run_dir: Path, proc, timeout=300):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no training step logged (exit {proc.poll()})")


def wait_for_torch_import(proc, timeout=120) -> None:
    """Until ``proc`` has started importing torch (its shared library is mapped): a moment inside
    the start-up, reached by observation rather than a fixed sleep."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"the process never imported torch (exit {proc.poll()})")


def trainers_of(recipe: Path) -> list[int]:
    """Pids of the training processes started with this recipe (the launcher excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(recipe).encode() in args and not any(b"accelerate" in a for a in args[:2]):
            pids.append(int(entry.name))
    return pids


def test_sigterm_stops_a_training_with_one_line_and_its_checkpoint_intact(tmp_path, data):
    recipe = long_run(tmp_path, data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / f".checkpoint.pt.tmp-{DEAD_PID}").write_bytes(b"half a checkpoint of a killed run")
    alive = run_dir / f".results.json.tmp-{os.getpid()}"  # a live process's temp is not touched
    alive.write_bytes(b"{}")
    proc = subprocess.Popen([PYTHON, "fasttrain/run.py", str(recipe)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc)
    assert not (run_dir / f".checkpoint.pt.tmp-{DEAD_PID}").exists() and alive.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"fasttrain: stopped by SIGTERM (at epoch \d+ step \d/3|after epoch \d+): checkpoint "
                        r"written \(\d+ updates\); resume with run.resume=auto", line), line
    state = checkpoint.load(run_dir / "checkpoint.pt", "test")  # the exact step it stopped at
    assert state["updates"] == 3 * state["epoch"] + state["step_in_epoch"] and state["updates"] >= 1
    assert sorted(p.name for p in run_dir.glob(".*tmp*")) == [alive.name]
    # outside the training loop (here: in the middle of start-up) a stop is immediate, and says so
    proc = subprocess.Popen([PYTHON, "fasttrain/run.py", str(recipe), f"run.dir={tmp_path / 'other'}"], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_torch_import(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "fasttrain: stopped by SIGTERM; the last checkpoint is intact"


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_sigterm_to_accelerate_launch_stops_the_trainers(tmp_path, data, num_processes):
    recipe = long_run(tmp_path, data)
    mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    launcher = subprocess.Popen([ACCELERATE, "launch", "-q", *mode, "--num_processes", str(num_processes),
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *FREE_PORT,
                                 "fasttrain/run.py", str(recipe)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path / "run", launcher)
    assert len(trainers_of(recipe)) == num_processes
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    deadline = time.time() + 60
    while trainers_of(recipe) and time.time() < deadline:
        time.sleep(0.2)
    assert trainers_of(recipe) == [], "a trainer outlived its launcher"
    assert "fasttrain: stopped by SIGTERM" in err
    assert not (tmp_path / "run" / "results.json").exists()


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow(minutes=1.5)
@pytest.mark.parametrize("num_processes", [1, 2])
def test_sigterm_mid_epoch_then_resume_equals_the_run_never_stopped(tmp_path, data, num_processes):
    settings = dict(schedule={"epochs": 3, "warmup_epochs": 0.5}, train={"precision": "fp32", "batch_size": 4},
                    linear_eval={"enabled": False}, monitor={"knn_every": 0})  # 24 images: 6 steps per epoch
    mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    command = [ACCELERATE, "launch", "-q", *mode, "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *FREE_PORT, "fasttrain/run.py"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    (tmp_path / "never").mkdir()
    subprocess.run([*command, str(write_recipe(tmp_path / "never", data, **settings))], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)

    recipe = write_recipe(tmp_path, data, **settings)
    launcher = subprocess.Popen([*command, str(recipe)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 2) and time.time() < deadline:
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    while trainers_of(recipe) and time.time() < deadline:
        time.sleep(0.1)
    stopped = checkpoint.load(tmp_path / "run" / "checkpoint.pt", "test")
    assert "fasttrain: stopped by SIGTERM" in err and stopped["updates"] < 18
    subprocess.run([*command, str(recipe)], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    reference, resumed = train_rows(tmp_path / "never" / "run"), train_rows(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(1, 19))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-6, abs=1e-7)
    final = checkpoint.load(tmp_path / "run" / "checkpoint.pt", "test")["model"]
    for name, weight in checkpoint.load(tmp_path / "never" / "run" / "checkpoint.pt", "test")["model"].items():
        assert torch.allclose(final[name].float(), weight.float(), rtol=1e-5, atol=1e-6), name


def test_replacing_keeps_the_old_file_on_any_failure_and_leaves_no_temp(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good")
    for failure in (Stopped(signal.SIGTERM), KeyboardInterrupt(), ValueError("bug")):
        with pytest.raises(type(failure)):
            with replacing(target) as tmp:
                tmp.write_bytes(b"half")
                raise failure
        assert target.read_bytes() == b"good" and list(tmp_path.iterdir()) == [target]
    with replacing(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]
    (tmp_path / f".metrics.csv.tmp-{DEAD_PID}").write_bytes(b"x")
    (tmp_path / f".out.beton.tmp-{DEAD_PID}").write_bytes(b"x")
    assert [p.name for p in sweep_stale_temps(tmp_path, "out.beton")] == [f".out.beton.tmp-{DEAD_PID}"]
    assert [p.name for p in sweep_stale_temps(tmp_path)] == [f".metrics.csv.tmp-{DEAD_PID}"]


def test_a_full_disk_while_saving_a_checkpoint_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous checkpoint")
    # the temp name of this process is a link to /dev/full: every write fails with ENOSPC, as on a full disk
    (tmp_path / f".checkpoint.pt.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError) as info:
        checkpoint.atomic_save({"model": torch.zeros(1000)}, target)
    line = describe_os_error(info.value)
    assert "No space left on device" in line and str(target) in line and "\n" not in line
    assert target.read_bytes() == b"previous checkpoint" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("change,names", [
    (["data.val=null"], "data.val: no path given"),
    (["linear_eval.batch_size=256"], "linear_eval.batch_size=256: more than the 24 training images"),
])
def test_what_evaluation_needs_is_checked_before_the_first_step(tmp_path, data, change, names):
    recipe = write_recipe(tmp_path, data, "supcon_s", train={"precision": "fp32"}, monitor={"knn_every": 0})
    proc = launch("fasttrain/run.py", recipe, *change, accelerate=False, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert names in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_unreadable_validation_images_are_skipped_counted_and_never_duplicated(tmp_path, data):
    val = make_image_folder(tmp_path / "val", classes=3, per_class=3, size=(24, 20), seed=1, corrupt=2)
    recipe = write_recipe(tmp_path, data, "ce", train={"precision": "fp32"}, monitor={"knn_every": 1})
    proc = launch("fasttrain/run.py", recipe, f"data.val={val}", "linear_eval.batch_size=4", accelerate=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["linear_eval"]["samples"] == 9 and results["linear_eval"]["skipped_images"] == 2
    assert "broken_0.jpg" in proc.stderr and "broken_1.jpg" in proc.stderr


@pytest.mark.parametrize("where,names", [
    ("file", "exists and is not a directory"),
    ("under_file", "a part of this path is a file, not a directory"),
])
def test_an_unusable_run_dir_is_one_line(tmp_path, data, where, names):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    run_dir = blocker if where == "file" else blocker / "run"
    proc = launch("fasttrain/run.py", write_recipe(tmp_path, data), f"run.dir={run_dir}", accelerate=False,
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"fasttrain: error: run.dir={run_dir}: {names}"]
    assert blocker.read_text() == "a file"


def test_a_symlink_loop_in_a_class_folder_is_refused_naming_the_link(tmp_path, data):
    train = make_image_folder(tmp_path / "train", classes=2, per_class=4, size=(24, 20))
    (train / "class_01" / "again").symlink_to("..")
    proc = launch("fasttrain/run.py", write_recipe(tmp_path, data), f"data.train={train}", accelerate=False,
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"data.train: {train / 'class_01' / 'again'} links back to" in proc.stderr.strip().splitlines()[-1]


def test_a_key_given_twice_in_a_recipe_is_refused(tmp_path, data):
    recipe = write_recipe(tmp_path, data)
    recipe.write_text(recipe.read_text() + "method: ce\n")
    proc = launch("fasttrain/run.py", recipe, accelerate=False, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fasttrain: error: {recipe}:{len(recipe.read_text().splitlines())}: "
                                                f"not valid YAML (duplicate key 'method')"]


def test_a_beton_given_to_an_image_folder_loader_says_so(tmp_path, data):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"ffcv")
    proc = launch("fasttrain/run.py", write_recipe(tmp_path, data), f"data.train={beton}", accelerate=False,
                  check=False)
    assert proc.returncode == 2 and "a .beton is read by loader=ffcv" in proc.stderr


def test_no_readable_image_in_a_worker_is_one_line(tmp_path, data):
    train = tmp_path / "train"
    for c in range(3):  # the classes of the validation split
        (train / f"class_{c:02d}").mkdir(parents=True)
        for i in range(4):
            (train / f"class_{c:02d}" / f"{i}.jpg").write_bytes(b"not a jpeg")
    proc = launch("fasttrain/run.py", write_recipe(tmp_path, data), f"data.train={train}", "data.num_workers=1",
                  "train.batch_size=4", "linear_eval.batch_size=4", accelerate=False, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"fasttrain: error: data.train: no readable image in {train}"


def test_ctrl_c_during_start_up_is_one_line(tmp_path, data):
    # SIGINT as a terminal gives it: a shell without job control starts background commands (CI run
    # with `&`) with SIGINT ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen([PYTHON, "fasttrain/run.py", str(write_recipe(tmp_path, data))], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_torch_import(proc)  # inside the imports of torch, accelerate and pydantic
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "fasttrain: interrupted; the last checkpoint is intact" in err.strip().splitlines()


def poison_losses(monkeypatch, bad_calls: set):
    """Make the loss NaN on the given calls (1-based) of the training objective."""
    from fasttrain.engine import trainer

    real, calls = trainer.objective, [0]

    class Poisoned:
        def __init__(self, loss_fn):
            self.loss_fn = loss_fn

        def __getattr__(self, name):
            return getattr(self.loss_fn, name)

        def __call__(self, model, views, labels, **kwargs):
            loss, logs = self.loss_fn(model, views, labels, **kwargs)
            calls[0] += 1
            return (loss * float("nan") if calls[0] in bad_calls else loss), logs

    monkeypatch.setattr(trainer, "objective", lambda recipe: Poisoned(real(recipe)))


def test_a_nonfinite_loss_skips_its_update_and_too_many_in_a_row_stop_the_run(tmp_path, data, monkeypatch, capsys):
    from fasttrain.recipe import load_recipe
    from fasttrain.run import main, run

    recipe = write_recipe(tmp_path, data, "supcon_s", schedule={"epochs": 3}, train={"precision": "fp32"},
                          linear_eval={"enabled": False}, monitor={"knn_every": 0}, run={"dir": str(tmp_path / "a"),
                                                                                          "checkpoint_every": 1})
    poison_losses(monkeypatch, {2, 3})
    results = run(load_recipe(recipe))  # 3 steps per epoch, 9 in all, 2 of them skipped
    assert results["nonfinite_steps"] == 2 and results["steps"] == 9
    weights = checkpoint.load(tmp_path / "a" / "checkpoint.pt", "test")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    out = capsys.readouterr().out  # logged every step: each skip is reported at its own step
    assert "1 update(s) skipped by epoch 1 step 2/3 (loss not finite, or an fp16 overflow): 1 skipped so far" in out
    assert "1 update(s) skipped by epoch 1 step 3/3 (loss not finite, or an fp16 overflow): 2 skipped so far" in out

    poison_losses(monkeypatch, set(range(4, 100)))  # from the first step of epoch 2 on
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main([str(recipe), f"run.dir={tmp_path / 'b'}", "train.max_nonfinite_steps=3"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert code == 3
    assert "loss not finite for 3 steps in a row (train.max_nonfinite_steps), noticed at epoch 2 step 3/3; the " \
        "last checkpoint is intact" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "b" / "checkpoint.pt", "test")["epoch"] == 1  # the last good one, intact


def test_step_checkpoints_keep_the_newest_and_a_broken_latest_falls_back(tmp_path, data, caplog):
    from fasttrain.recipe import load_recipe
    from fasttrain.run import run

    recipe = write_recipe(tmp_path, data, "supcon_s", train={"precision": "fp32", "batch_size": 4},
                          linear_eval={"enabled": False}, monitor={"knn_every": 0},
                          run={"dir": str(tmp_path / "run"), "checkpoint_every_steps": 2, "keep_last": 2})
    run(load_recipe(recipe))  # 6 steps: kept at updates 2, 4, 6 (epoch end), the newest 2 stay
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == ["checkpoint-00000004.pt",
                                                                        "checkpoint-00000006.pt"]
    assert checkpoint.load(run_dir / "checkpoint-00000004.pt", "test")["step_in_epoch"] == 4
    (run_dir / "checkpoint.pt").write_bytes(b"")  # truncated in place: its linked copy checkpoint-6 too
    results = run(load_recipe(recipe, ["schedule.epochs=2"]))
    assert results["steps"] == 12
    warning = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warning) == 1 and "not a readable checkpoint" in warning[0]
    assert warning[0].endswith(f"resuming from {run_dir / 'checkpoint-00000004.pt'}, the newest readable one")
    assert not [r for r in caplog.records if "have a positive" in r.getMessage()]  # batch 4, 3 classes: 70 %


def test_a_supcon_s_batch_that_rarely_holds_a_positive_is_warned_at_start(tmp_path, data, caplog):
    from fasttrain.recipe import load_recipe
    from fasttrain.run import run

    recipe = write_recipe(tmp_path, data, "supcon_s", train={"precision": "fp32", "batch_size": 2,
                                                             "max_steps_per_epoch": 1},
                          linear_eval={"enabled": False}, monitor={"knn_every": 0}, run={"dir": str(tmp_path / "r")})
    run(load_recipe(recipe))
    warning = [r.getMessage() for r in caplog.records if "have a positive" in r.getMessage()]
    assert len(warning) == 1 and "2 images per contrast and 3 classes, only about 33%" in warning[0]


def test_the_stop_signals_are_the_recipes(monkeypatch):
    from fasttrain import faults

    monkeypatch.setattr(faults, "_launched_by_a_launcher", lambda: False)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        faults.stop_on_signals(["SIGTERM", "SIGUSR1"])
        faults.stop_on_signals(["SIGUSR2"])  # run.stop_signals=[SIGUSR2]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        with pytest.raises(Stopped) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(1)
        assert stop.value.name == "SIGUSR2" and stop.value.exit_code == 140
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        faults._handled.clear()


@pytest.mark.slow
def test_the_slurm_script_requeues_a_run_stopped_for_preemption(tmp_path, data):
    """scripts/slurm_train.sh under stand-ins for srun (one task, SLURM's variables) and scontrol
    (records what it is asked): SIGUSR1 before the time limit stops the trainer with a checkpoint,
    and the script requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nshift  # --kill-on-bad-exit\n'
                                  'SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_NTASKS_PER_NODE=1 "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n'
                                      '[ "$1" = show ] && echo 127.0.0.1\nexit 0\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    recipe = long_run(tmp_path, data)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "1"}
    job = subprocess.Popen(["bash", "scripts/slurm_train.sh", str(recipe)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path / "run", job)
    (trainer,) = [pid for pid in trainers_of(recipe) if b"fasttrain/run.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
                  and b"bash" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(trainer, signal.SIGUSR1)  # SLURM's --signal=USR1@300 reaches the job step's tasks
    out, err = job.communicate(timeout=120)
    assert job.returncode == 138, err[-2000:]
    assert "stopped by SIGUSR1" in err and "requeued" in out
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["show hostnames node1", "requeue 42"]
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt", "test")["updates"] >= 1
