"""The GPU kit (scripts/gpu_check.sh): its CPU dry run is the same command at tiny sizes, so every part
it runs on a GPU node is exercised here; a failing or slow part costs only itself."""
import importlib.util
import json
import subprocess
import sys

import pytest

from benchmarks import gpu_kit
from conftest import REPO


LOADER_FED = ("loader_fed",)  # the longest part, a test of its own so that two workers share the kit's dry run
THE_REST = ("selftest", "step_cost", "throughput", "host_syncs", "demo", "loss_scaling", "recipe_cost")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def dry_run(out, parts):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--device", "cpu", "--dry-run", "--budget", "900",
                           "--parts", ",".join(parts)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kit = json.loads((out / "kit.json").read_text())
    assert {p["name"]: p["status"] for p in kit["parts"]} == {name: "ok" for name in parts}
    assert not (out / "data").exists()  # the generated images are removed
    return kit["results"]


def test_the_two_dry_run_tests_cover_every_part_of_the_kit():
    args = gpu_kit.parse_args(["--dry-run", "--device", "cpu", "--out", "kit"])
    plan = gpu_kit.plan(args, gpu_kit.DRY, REPO / "photos", REPO / "demo")
    assert sorted(p.name for p in plan) == sorted(LOADER_FED + THE_REST)


@pytest.mark.slow(minutes=3)
def test_the_kit_dry_run_runs_its_parts_and_reports_their_numbers(tmp_path):
    out = tmp_path / "kit"
    results = dry_run(out, THE_REST)
    for method in gpu_kit.DRY.methods:
        assert results[f"step_cost/{method}"]["images_per_second"] > 0
    assert results["step_cost/selfcon"]["time_ratio_to_selfcon"] == 1
    assert results["train_throughput/selfcon/torchvision"]["ratio_to_synthetic"] > 0
    assert results["trainer_overhead"]["trainer_over_bare"] > 0
    # the trainer's step reads nothing back from the device when its logs are not read
    assert {k: v["python_reads_per_step"] for k, v in results.items() if k.startswith("host_syncs/")} == {
        f"host_syncs/{m}": 0 for m in ("ce", "supcon", "supcon_s", "selfcon", "selfcon_m", "dsn", "cds", "simclr",
                                        "mixco")}
    demo = json.loads((out / "demo" / "results.json").read_text())
    # 10 classes told apart by colour: the linear evaluation is far above chance (10%)
    assert demo["knn"] and demo["linear_eval"]["exits"]["backbone"]["top1"] > 30
    assert results["recipe_cost/selfcon_cifar100_r18"]["device_hours"] > 0  # the paper recipe's own step, timed
    assert "| selftest | ok |" in (out / "kit.md").read_text()


@pytest.mark.slow(minutes=3)
def test_the_kit_dry_run_feeds_the_trainer_from_every_installed_loader(tmp_path):
    results = dry_run(tmp_path / "kit", LOADER_FED)
    for stage in ("device", "host"):  # the torchvision loader with its colour on either side
        assert results[f"loader_fed/{stage}/torchvision"]["ratio_to_synthetic"] > 0
    assert results["loader_fed/gpu_decode/torchvision"]["ratio_to_synthetic"] > 0  # JPEGs decoded on the device
    for backend, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali")):
        if installed(module):
            assert results[f"loader_fed/device/{backend}"]["ratio_to_synthetic"] > 0


def test_a_failing_part_fails_the_kit_a_slow_one_times_out_and_the_rest_is_skipped(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(gpu_kit, "MIN_PART_SECONDS", 2)
    parts = [gpu_kit.Part("fails", 30, [[sys.executable, "-c", "raise SystemExit(3)"]]),
             gpu_kit.Part("slow", 2, [[sys.executable, "-c", "import time; time.sleep(30)"]]),
             gpu_kit.Part("late", 30, [[sys.executable, "-c", "pass"]])]
    deadline = time.monotonic() + 3.5  # after the slow part's 2 s, less than MIN_PART_SECONDS is left
    for part in parts:
        gpu_kit.run_part(part, deadline, tmp_path)
    assert parts[0].status.startswith("failed: exit status 3")
    assert parts[1].status.startswith("timed out")
    assert parts[2].status == "skipped: out of time"
    assert (tmp_path / "fails.log").read_text().startswith("$ ")


DECODE = """
import json, sys, ffcv, torch
from loaders import DataConfig, LoaderRequest, build_loader
loader = build_loader("ffcv", DataConfig(val=sys.argv[1], image_size=32, num_workers=1),
                      LoaderRequest(split="val", batch_size=3, augment="center"))
images = torch.cat([views[0] for views, _ in loader])  # a batch: (views, labels)
mapped = {line.split()[-1] for line in open("/proc/self/maps") if "opencv_core" in line or "turbojpeg" in line}
print(json.dumps({"ffcv": ffcv.__file__, "libraries": sorted(mapped), "sum": images.double().sum().item()}))
"""


@pytest.mark.slow
def test_the_bundle_decodes_with_its_own_ffcv_and_libraries_as_the_installed_ones_do(tmp_path):
    pytest.importorskip("ffcv")
    from benchmarks import gpu_bundle
    from conftest import make_image_folder
    from loaders import ffcv_convert

    bundle = tmp_path / "bundle"
    gpu_bundle.build(bundle, python="3.11", wheels=False)  # this machine's Python: the node's needs its wheels
    libraries = sorted(p.name for p in (bundle / "lib").iterdir())
    assert any("opencv_core" in n for n in libraries) and any("turbojpeg" in n for n in libraries)
    assert not [n for n in libraries if n.startswith(gpu_bundle.RUNTIMES)]  # the node's own runtimes serve those
    beton = tmp_path / "val.beton"
    ffcv_convert.convert(make_image_folder(tmp_path / "images", classes=2, per_class=3), beton, num_workers=1)

    def decode(env):
        proc = subprocess.run([sys.executable, "-c", DECODE, str(beton)], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    installed = decode({"PYTHONPATH": str(REPO)})
    bundled = decode({"PYTHONPATH": f"{bundle / 'site'}:{REPO}", "LD_LIBRARY_PATH": str(bundle / "lib")})
    assert bundled["ffcv"].startswith(str(bundle)) and not installed["ffcv"].startswith(str(bundle))
    assert len(bundled["libraries"]) == 2 and all(p.startswith(str(bundle / "lib")) for p in bundled["libraries"])
    assert bundled["sum"] == installed["sum"] > 0  # the same pixels


def test_a_bundle_that_fails_to_build_leaves_the_old_one_and_says_why_in_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv")
    from benchmarks import gpu_bundle

    def no_index(site, python):
        raise subprocess.CalledProcessError(1, [sys.executable, "-m", "pip", "install"])

    monkeypatch.setattr(gpu_bundle, "download_wheels", no_index)
    old = tmp_path / "bundle"
    (old / "site").mkdir(parents=True)
    (old / "site" / "kept").write_text("the bundle built before")
    assert gpu_bundle.main([str(old)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install" in error and "left as it was" in error
    assert (old / "site" / "kept").read_text() == "the bundle built before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no half-built folder beside it
