"""The main job end to end: recipes, accelerate launch, processes, resume, bad input."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_image_folder
from fasttrain.methods import METHODS

PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# a free port for every launch: tests running side by side (pytest -n) never meet on 29500
FREE_PORT = ["--main_process_port", "0"]


def write_recipe(tmp_path, data_root, method="selfcon", **sections):
    recipe = {
        "method": method,
        "model": {"arch": "resnet18", "stem": "cifar", "exits": ["layer2"], "proj_dim": 16},
        "data": {"train": str(data_root / "train"), "val": str(data_root / "val"), "image_size": 16,
                 "num_workers": 0},
        "train": {"batch_size": 8, "precision": "bf16", "log_every": 1},
        "schedule": {"epochs": 1, "warmup_epochs": 0},
        "linear_eval": {"epochs": 1, "batch_size": 8},
        "run": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value) if isinstance(value, dict) else recipe.update({key: value})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "train", classes=3, per_class=8, size=(24, 20), corrupt=1)
    make_image_folder(root / "val", classes=3, per_class=3, size=(24, 20), seed=1)
    return root


def launch(*args, accelerate=True, num_processes=1, check=True, timeout=600):
    if accelerate:
        # several CPU processes: --multi_gpu with ACCELERATE_USE_CPU=1 (--cpu would start only one)
        mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
        cmd = [ACCELERATE, "launch", "-q", *mode, "--num_processes", str(num_processes), *FREE_PORT, *map(str, args)]
    else:
        cmd = [PYTHON, *map(str, args)]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"} if num_processes > 1 else ENV
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_results(tmp_path):
    return json.loads((tmp_path / "run" / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "supcon", "supcon_s", "selfcon", "selfcon_m", "mixco"])
def test_each_method_trains_under_accelerate_launch(tmp_path, data, method):
    recipe = write_recipe(tmp_path, data, method)
    proc = launch("fasttrain/run.py", recipe)
    results = read_results(tmp_path)
    assert results["method"] == method and results["arch"] == "resnet18"
    assert results["epochs"] == 1 and results["steps"] == 3  # 25 images (24 + 1 broken), batch 8, drop_last
    assert results["images_per_second"] > 0 and results["peak_memory_bytes"] > 0
    evaluation = results["linear_eval"]
    assert evaluation["samples"] == 9
    for name in ("backbone", "subnetwork", "ensemble"):
        if method in ("selfcon", "selfcon_m") or name == "backbone":
            assert 0 <= evaluation[name]["top1"] <= evaluation[name]["top5"] <= 100
        else:
            assert evaluation[name] is None
    assert "backbone" in proc.stdout  # the printed table
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    exits = ["sub0", "backbone"] if method in ("selfcon", "selfcon_m") else ["backbone"]
    assert all(0 <= r[f"spread/{e}"] <= 1.5 for r in train for e in exits) and all(r["grad_norm"] > 0 for r in train)
    # the k-NN monitor: every exit and the ensemble, per epoch, in the metrics and in results.json
    knn = [r for r in rows if r["kind"] == "knn"]
    names = exits + (["ensemble"] if len(exits) > 1 else [])
    assert [r["epoch"] for r in knn] == [1] and results["knn"] == [{k: knn[0][k] for k in ["epoch", *names]}]
    assert all(0 <= knn[0][n] <= 100 for n in names) and "k-NN top-1" in proc.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.slow(minutes=2)
@pytest.mark.parametrize("method", ["dsn", "cds"])
def test_deep_supervision_trains_and_evaluates_its_own_classifiers(tmp_path, data, method):
    """1-stage evaluation: dsn reports each exit's classifier and their ensemble, cds its backbone
    classifier; cds runs compiled (bf16, channels_last as every recipe here)."""
    model = {"exits": ["layer1", "layer2", "layer3"], "exit_kind": "sepconv", "head": "none"}
    recipe = write_recipe(tmp_path, data, method, model=model, train={"compile": method == "cds"},
                          loss={"temperature": 0.07})
    proc = launch("fasttrain/run.py", recipe)
    evaluation = read_results(tmp_path)["linear_eval"]
    names = ["sub0", "sub1", "sub2", "backbone", "ensemble"] if method == "dsn" else ["backbone"]
    assert list(evaluation["exits"]) == names and evaluation["samples"] == 9
    assert all(0 <= e["top1"] <= e["top5"] <= 100 for e in evaluation["exits"].values())
    assert all(f"| {n}" in proc.stdout for n in names)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = ["loss/ce/sub0", "loss/ce/backbone"] if method == "dsn" else ["loss/ce", "loss/contrast/sub2"]
    assert all(r[t] > 0 for r in rows if r["kind"] == "train" for t in terms)
    if method == "dsn":  # the floor of an encoder whose method trains classifiers: a linear evaluation of it
        launch("fasttrain/run.py", recipe, "--random-init", accelerate=False)
        floor = json.loads((tmp_path / "run" / "random_init.json").read_text())["linear_eval"]
        assert list(floor["exits"]) == names


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_under_two_processes(tmp_path, data, method):
    """DistributedDataParallel reduces every parameter every update: a parameter without a gradient
    (a projection head CE never reads, a BatchNorm head DSN never calls) fails the second step."""
    model = {"head": "mlp_bn"} if method != "cds" else {"exits": ["layer1", "layer2"], "exit_kind": "sepconv"}
    recipe = write_recipe(tmp_path, data, method, model=model, train={"precision": "fp32"},
                          linear_eval={"enabled": False}, monitor={"knn_every": 0}, schedule={"epochs": 2})
    launch("fasttrain/run.py", recipe, num_processes=2)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # 24 images, batch 8 (4 per process), 2 epochs
    assert all(r["skipped_steps"] == 0 and r["loss"] == r["loss"] for r in train)


DIST_METHODS = ["supcon", "supcon_s", "selfcon", "selfcon_m", "dsn", "cds", "simclr", "selfcon_mu", "mixco"]


@pytest.mark.slow(minutes=1.5)
def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    launch("tests/dist_equivalence.py", ",".join(DIST_METHODS), one)
    launch("tests/dist_equivalence.py", ",".join(DIST_METHODS), two, num_processes=2)
    mismatched = []
    for method in DIST_METHODS:
        a, b = torch.load(one / f"{method}.pt"), torch.load(two / f"{method}.pt")
        assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > (1 if method == "mixco" else 10), method
        # to float32 summation order, relative to each tensor's size
        grads = [name for name, grad in a["grads"].items()
                 if (grad - b["grads"][name]).norm() > 1e-5 * grad.norm() + 1e-6]
        if a["loss"] != pytest.approx(b["loss"], rel=1e-5) or grads:
            mismatched.append(f"{method}: loss {a['loss']:.6f} vs {b['loss']:.6f}, {len(grads)} of "
                              f"{len(a['grads'])} gradients differ (first: {grads[:1]})")
    assert not mismatched, mismatched


@pytest.mark.slow
def test_resume_auto_continues_the_interrupted_run(tmp_path, data):
    settings = dict(schedule={"epochs": 4, "warmup_epochs": 1}, linear_eval={"enabled": False})
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    launch("fasttrain/run.py", write_recipe(reference_dir, data, **settings), accelerate=False)
    reference = [row for row in map(json.loads, (reference_dir / "run" / "metrics.jsonl").read_text().splitlines())
                 if row["kind"] == "train"]

    recipe = write_recipe(tmp_path, data, **settings)
    proc = subprocess.Popen([PYTHON, "fasttrain/run.py", str(recipe)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert interrupted_at < 4, "the run finished before it could be interrupted"

    launch("fasttrain/run.py", recipe, accelerate=False)
    results = read_results(tmp_path)
    assert results["epochs"] == 4 and results["steps"] == reference[-1]["step"] == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r for r in rows if r["kind"] == "train"}
    for row in reference:  # the same lr at the same step: the schedule continued, no epoch lost
        assert resumed[row["step"]]["lr"] == pytest.approx(row["lr"])
    assert sorted(resumed) == list(range(1, 13))
    # stopped right after the last epoch's checkpoint, before its k-NN: the resumed run scores that epoch
    kept = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"epoch": 4' not in line
            or '"kind": "knn"' not in line]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    launch("fasttrain/run.py", recipe, accelerate=False)
    assert [r["epoch"] for r in read_results(tmp_path)["knn"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("override,names", [
    ("train.log_evry=1", "train.log_evry: unknown key"),
    ("train.batch_size=many", "train.batch_size"),
    ("model.exits=[layer4]", "model.exits"),
    ("method=simclr_v2", "method"),
    ("loss.mix_weight=0.5", "loss.mix_weight"),
    ("optim.lr=inf", "optim.lr"),  # not a number a run can use
    ("loss.temperature=nan", "loss.temperature"),
    ("train.batch_size=1", "train.batch_size=1: 1 image per process"),  # BatchNorm needs two
])
def test_bad_recipe_exits_nonzero_naming_the_key(tmp_path, data, override, names):
    recipe = write_recipe(tmp_path, data)
    proc = launch("fasttrain/run.py", recipe, override, accelerate=False, check=False)
    assert proc.returncode == 2
    assert names in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_dataset_path_names_the_key(tmp_path, data):
    recipe = write_recipe(tmp_path, data)
    proc = launch("fasttrain/run.py", recipe, f"data.train={tmp_path / 'nowhere'}", accelerate=False, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.train: no such directory" in proc.stderr and "nowhere" in proc.stderr


@pytest.mark.parametrize("content,flag", [
    (b"", "--eval-only"),  # empty
    (b"PK\x03\x04 truncated zip", "--eval-only"),  # a torch.save cut short
    (None, "run.resume"),  # a readable torch file that is no checkpoint of this project
])
def test_a_broken_checkpoint_is_one_line_naming_flag_and_file(tmp_path, data, content, flag):
    broken = tmp_path / "broken.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, broken)
    else:
        broken.write_bytes(content)
    recipe = write_recipe(tmp_path, data)
    args = ["--eval-only", broken] if flag == "--eval-only" else [f"run.resume={broken}"]
    proc = launch("fasttrain/run.py", recipe, *args, accelerate=False, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = [text for text in proc.stderr.splitlines() if text.startswith("fasttrain: error:")]
    assert len(line) == 1 and flag in line[0] and str(broken) in line[0], proc.stderr
    assert ("not a fasttrain checkpoint" if content is None else "not a readable checkpoint") in line[0]


@pytest.mark.slow
def test_bad_recipe_under_accelerate_launch(tmp_path, data):
    proc = launch("fasttrain/run.py", write_recipe(tmp_path, data), "optim.nam=sgd", check=False)
    assert proc.returncode != 0
    assert "optim.nam: unknown key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, data):
    # batch 5 divides the 25 files, so drop_last cannot hide the broken one
    recipe = write_recipe(tmp_path, data, linear_eval={"enabled": False}, train={"batch_size": 5})
    proc = launch("fasttrain/run.py", recipe, accelerate=False)
    assert read_results(tmp_path)["skipped_images"] == 1
    assert "broken_0.jpg" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure mode is a machine without GPUs")
def test_a_launch_whose_processes_are_not_one_group_is_refused(tmp_path, data):
    # --multi_gpu without the CPU switch on a machine without GPUs starts two lone processes
    recipe = write_recipe(tmp_path, data)
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", *FREE_PORT, "fasttrain/run.py",
                           str(recipe)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "fasttrain: error: WORLD_SIZE=2 but this process is alone in its group" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_loader_backend_trains_under_accelerate_launch(tmp_path, data, backend):
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    paths = {}
    if backend == "ffcv":
        from loaders.ffcv_convert import convert
        for split in ("train", "val"):
            paths[split] = tmp_path / f"{split}.beton"
            convert(data / split, paths[split], write_mode="jpg", num_workers=1)
    recipe = write_recipe(tmp_path, data, "selfcon", loader=backend,
                          data={**{k: str(v) for k, v in paths.items()}, "num_workers": 1})
    launch("fasttrain/run.py", recipe)
    results = read_results(tmp_path)
    assert results["loader"] == backend
    assert results["steps"] == 3  # the broken file is excluded up front: 24 images, batch 8
    assert results["linear_eval"]["samples"] == 9
    assert 0 <= results["linear_eval"]["ensemble"]["top1"] <= 100


@pytest.mark.slow(minutes=1.5)
def test_eval_only_evaluates_a_checkpoint_without_touching_its_results(tmp_path, data):
    # trained under torch.compile: the checkpoint must hold the plain module's weights
    recipe = write_recipe(tmp_path, data, linear_eval={"enabled": False}, train={"compile": True})
    launch("fasttrain/run.py", recipe, accelerate=False)
    before = (tmp_path / "run" / "results.json").read_text()
    proc = launch("fasttrain/run.py", recipe, "--eval-only", tmp_path / "run" / "checkpoint.pt",
                  "linear_eval.enabled=true", accelerate=False)
    assert (tmp_path / "run" / "results.json").read_text() == before
    evaluation = json.loads((tmp_path / "run" / "linear_eval.json").read_text())["linear_eval"]
    assert evaluation["samples"] == 9 and evaluation["subnetwork"] is not None
    assert "ensemble" in proc.stdout
    # the offline k-NN of the same checkpoint joins the linear evaluation's file
    proc = launch("fasttrain/run.py", recipe, "--eval-only", tmp_path / "run" / "checkpoint.pt", "--knn",
                  "--knn-k", "5", accelerate=False)
    both = json.loads((tmp_path / "run" / "linear_eval.json").read_text())
    assert both["linear_eval"] == evaluation
    knn = both["knn_eval"]
    assert (knn["k"], knn["temperature"], knn["bank_images"], knn["samples"]) == (5, 0.07, 24, 9)
    assert knn["exits"] == ["sub0", "backbone", "ensemble"] and "k-NN (k=5" in proc.stdout
    assert all(0 <= knn[n]["top1"] <= knn[n]["top5"] <= 100 for n in knn["exits"])


def test_knn_evaluates_an_existing_encoder_only(tmp_path, data):
    proc = launch("fasttrain/run.py", write_recipe(tmp_path, data), "--knn", accelerate=False, check=False)
    assert proc.returncode == 2 and "--knn evaluates an existing encoder" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trackers_receive_the_metrics_and_a_missing_tracker_is_one_line(tmp_path, data):
    pytest.importorskip("wandb", reason="the wandb extra of scripts/bootstrap.sh")
    recipe = write_recipe(tmp_path, data, train={"precision": "fp32"}, linear_eval={"enabled": False},
                          run={"trackers": ["tensorboard", "wandb"]})
    subprocess.run([PYTHON, "fasttrain/run.py", str(recipe)], cwd=REPO, check=True, capture_output=True,
                   env={**ENV, "WANDB_MODE": "offline"}, timeout=600)
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    for logged in (b"loss/backbone", b"knn/backbone", b"optim.lr"):  # a step metric, the k-NN curve, the recipe
        assert logged in record.read_bytes(), logged
    assert list((tmp_path / "run" / "fasttrain").glob("events.out.tfevents.*"))
    missing = next(t for t in ("mlflow", "aim", "clearml", "dvclive", "swanlab") if importlib.util.find_spec(t) is None)
    proc = launch("fasttrain/run.py", recipe, f"run.trackers=[{missing}]", accelerate=False, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (f"fasttrain: error: run.trackers: {missing} is not "
                                                            f"installed here (.venv/bin/pip install {missing})")


@pytest.mark.slow
def test_two_process_run_counts_every_validation_image_once(tmp_path, data):
    recipe = write_recipe(tmp_path, data, "selfcon", monitor={"profile": {"skip": 1, "steps": 2}})
    launch("fasttrain/run.py", recipe, num_processes=2)
    results = read_results(tmp_path)
    assert results["num_processes"] == 2
    assert results["steps"] == 3  # global batch 8 = 2 x 4 per process; 24 usable images -> 3 steps
    assert results["linear_eval"]["samples"] == 9  # 9 validation images, split 5 + 4, none padded
    # the main process's profile finds the loss's all-gather, and its backward
    parts = json.loads((tmp_path / "run" / "profile" / "profile.json").read_text())["parts_ms_per_step"]
    assert parts["gather"] > 0 and parts["backward_by_part"]["gather"] > 0


@pytest.mark.slow
def test_random_init_evaluates_the_untrained_encoder_beside_the_run(tmp_path, data):
    recipe = write_recipe(tmp_path, data, "selfcon")
    proc = launch("fasttrain/run.py", recipe, "--random-init", accelerate=False)
    results = json.loads((tmp_path / "run" / "random_init.json").read_text())
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert results["random_init"] is True and results["steps"] == 0 and "random initialisation" in proc.stdout
    assert results["linear_eval"]["samples"] == 9 and results["linear_eval"]["subnetwork"] is not None
    assert set(results["knn"][0]) == {"epoch", "sub0", "backbone", "ensemble"}


@pytest.mark.slow
def test_a_collapse_stop_exits_3_in_one_line_keeping_the_last_checkpoint(tmp_path, data):
    # every spread is below a threshold of 2: the run counts as collapsed from its first logged step
    recipe = write_recipe(tmp_path, data, "selfcon", schedule={"epochs": 3}, linear_eval={"enabled": False},
                          monitor={"collapse_threshold": 2.0, "collapse_patience": 4, "on_collapse": "stop",
                                   "knn_every": 0})
    proc = launch("fasttrain/run.py", recipe, accelerate=False, check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    line = [text for text in proc.stderr.splitlines() if text.startswith("fasttrain:")]
    assert len(line) == 1 and "collapse at step 5 (since step 1)" in line[0] and "exit sub0 spread" in line[0]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_eval_only_describes_what_the_checkpoint_holds(tmp_path, data):
    recipe = write_recipe(tmp_path, data, "selfcon", linear_eval={"enabled": False}, monitor={"knn_every": 0})
    launch("fasttrain/run.py", recipe, accelerate=False)
    launch("fasttrain/run.py", recipe, "--eval-only", tmp_path / "run" / "checkpoint.pt", "method=ce",
           "model.arch=resnet34", "linear_eval.enabled=true", accelerate=False)
    results = json.loads((tmp_path / "run" / "linear_eval.json").read_text())
    assert (results["method"], results["arch"]) == ("selfcon", "resnet18")
    assert results["linear_eval"]["subnetwork"] is not None


@pytest.mark.slow
def test_checkpoints_of_the_plain_head_evaluate_and_refuse_another_model(tmp_path, data):
    recipe = write_recipe(tmp_path, data, "selfcon", model={"head": "mlp"}, linear_eval={"enabled": False},
                          monitor={"knn_every": 0})
    launch("fasttrain/run.py", recipe, accelerate=False)
    path = tmp_path / "run" / "checkpoint.pt"
    # resuming with another head: one line naming the checkpoint, nothing overwritten
    before = path.read_bytes()
    proc = launch("fasttrain/run.py", recipe, "model.head=mlp_bn", "schedule.epochs=2", accelerate=False, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run.resume: {path} does not fit this model" in proc.stderr and path.read_bytes() == before
    # a checkpoint written before `model.head` existed holds the plain head: it still evaluates
    state = torch.load(path, weights_only=False)
    del state["recipe"]["model"]["head"]
    torch.save(state, path)
    launch("fasttrain/run.py", recipe, "--eval-only", path, "linear_eval.enabled=true", accelerate=False)
    assert json.loads((tmp_path / "run" / "linear_eval.json").read_text())["linear_eval"]["subnetwork"] is not None
