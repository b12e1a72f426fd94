"""The GPU kit: on a bare GPU node, one command that proves the main paths run and measures them.

    bash scripts/gpu_check.sh [OUT]                     # = python -m benchmarks.gpu_kit --out OUT
    python -m benchmarks.gpu_kit --device cpu --dry-run --out /tmp/kit   # the same parts, tiny, on a CPU

Each part runs in its own process under its own timeout (and the kit's overall --budget), so one
failure costs only itself; what it printed goes to ``OUT/logs/<part>.log``. Parts, in order of what
matters most when time runs short:

1. environment: versions, ``nvidia-smi``;
2. selftest: every installed loader x precision x compile path (``fasttrain.selftest``);
3. step_cost: ResNet-50, batch 128, 224 px, bf16, channels_last, eager, every method beside the
   paper's Table 2;
4. throughput: the trainer fed synthetic images and a folder of ImageNet-sized JPEGs made here
   (SelfCon and CE), and a bare PyTorch loop of the same model, batch and precision (the trainer's
   overhead as a ratio);
5. loader_fed: ResNet-50 SelfCon at batch 256 fed by every installed backend, the colour on the device
   and on the host, and by JPEGs decoded on the GPU (``data.decode: device``), each beside synthetic input;
6. host_syncs: host reads and CUDA synchronisations per unlogged step, per method;
7. step_cost_compiled and bare_loop_compiled: the same with ``torch.compile``;
8. demo: a short compiled run of the demo recipe with its k-NN monitor and linear evaluation;
9. loss_scaling: the contrastive loss's time and memory against the batch;
10. recipe_cost: every paper recipe's own step, timed, as device-hours (docs/reproduce.md's column).

``OUT/kit.json`` holds every part's status, wall time and headline numbers; ``OUT/kit.md`` the table.
Exit status 1 if any part failed or timed out (a part skipped for want of time is not a failure).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from benchmarks.common import REPO, markdown_table  # noqa: E402
from benchmarks.common import environment as machine  # noqa: E402
from fasttrain.files import write_json, write_text  # noqa: E402

MIN_PART_SECONDS = 20  # a part is not started with less time than this left


@dataclass(frozen=True)
class Sizes:
    arch: str
    batch: int
    image: int
    precision: str
    methods: tuple[str, ...]
    compiled_methods: tuple[str, ...]
    steps: int
    photos: tuple[int, int, int]  # classes, train images per class, (width, height) below
    photo_size: tuple[int, int]
    workers: int
    loss_batches: str


GPU = Sizes("resnet50", 128, 224, "bf16",
            ("ce", "supcon", "supcon_s", "selfcon", "selfcon_m", "dsn", "cds", "simclr", "mixco"),
            ("ce", "selfcon"), 30, (8, 480, 10), (500, 375), max(1, min(12, (os.cpu_count() or 2) - 2)),
            "2048,8192")
DRY = Sizes("resnet18", 8, 32, "fp32", ("ce", "selfcon", "supcon"), (), 2, (2, 16, 2), (64, 48), 0, "64,128")


@dataclass
class Part:
    name: str
    timeout: float
    commands: list = field(default_factory=list)  # each a list of arguments
    status: str = "not run"
    seconds: float = 0.0


def python(*args) -> list:
    return [sys.executable, *map(str, args)]


def plan(args, sizes: Sizes, photos: Path, demo_data: Path) -> list[Part]:
    out, dev = args.out, args.device
    common = ["--arch", sizes.arch, "--batch-size", sizes.batch, "--image-size", sizes.image,
              "--precision", sizes.precision]
    step_cost = python("-m", "benchmarks.step_cost", *common, "--channels-last", "--warmup", 3,
                       "--steps", 10 if not args.dry_run else 2, "--timeout", 120)
    throughput = python("-m", "benchmarks.train_throughput", "--data", photos / "train", *common,
                        "--workers", sizes.workers, "--steps", sizes.steps,
                        "--timeout", 150)
    bare = python("-m", "benchmarks.bare_loop", *common, "--steps", sizes.steps)
    parts = [
        Part("selftest", 200, [python("-m", "fasttrain.selftest", "--device", dev, "--out", out / "selftest.json",
                                      # compiling is checked by step_cost_compiled and the demo
                                      *(["--quick"] if args.dry_run else ["--compile-precisions", "none"]))]),
        Part("step_cost", 300, [step_cost + ["--methods", ",".join(sizes.methods), "--out", out / "step_cost"]]),
        Part("throughput", 240, [
            throughput + ["--method", "selfcon", "--backends", "synthetic,torchvision",
                          "--out", out / "train_throughput_selfcon"],
            # ce is scored by its classifier on data.val, which this benchmark does not pass: synthetic only
            throughput + ["--method", "ce", "--backends", "synthetic", "--out", out / "train_throughput_ce"],
            bare + ["--out", out / "bare_loop" / "eager.json"]]),
        # issue: the loader-fed trainer at >= 0.9 of synthetic input (ResNet-50 SelfCon, batch 256 on a GPU)
        Part("loader_fed", 330, [
            python("-m", "benchmarks.train_throughput", "--data", photos / "train", "--arch", sizes.arch,
                   "--batch-size", 2 * sizes.batch, "--image-size", sizes.image, "--precision", sizes.precision,
                   "--workers", sizes.workers, "--steps", sizes.steps, "--timeout", 150, "--method", "selfcon",
                   "--backends", "synthetic,torchvision,dali,ffcv", "--colour-stage", stage,
                   "--beton-dir", photos.parent / "betons", "--out", out / f"loader_fed_{stage}")
            for stage in ("device", "host")] + [
            # torchvision with the JPEGs decoded on the GPU (nvJPEG): the GPU path without DALI
            python("-m", "benchmarks.train_throughput", "--data", photos / "train", "--arch", sizes.arch,
                   "--batch-size", 2 * sizes.batch, "--image-size", sizes.image, "--precision", sizes.precision,
                   "--workers", sizes.workers, "--steps", sizes.steps, "--timeout", 150, "--method", "selfcon",
                   "--backends", "synthetic,torchvision", "--decode", "device",
                   "--out", out / "loader_fed_gpu_decode")]),
        Part("host_syncs", 120, [python("-m", "benchmarks.host_syncs", "--out", out / "host_syncs",
                                        "--methods", "ce,supcon,supcon_s,selfcon,selfcon_m,dsn,cds,simclr,mixco")]),
    ]
    if sizes.compiled_methods:
        parts += [Part("step_cost_compiled", 240, [step_cost + ["--compile", "--methods",
                                                                  ",".join(sizes.compiled_methods),
                                                                  "--out", out / "step_cost_compiled"]]),
                  Part("bare_loop_compiled", 120, [bare + ["--compile", "--out", out / "bare_loop" / "compiled.json"]])]
    parts += [
        Part("demo", 240, [python("fasttrain/run.py", "recipes/demo_selfcon.yaml", f"data.train={demo_data}/train",
                                  f"data.val={demo_data}/val", f"run.dir={out / 'demo'}",
                                  f"train.compile={str(not args.dry_run).lower()}",
                                  f"train.precision={sizes.precision}", "schedule.epochs=2",
                                  f"data.num_workers={min(sizes.workers, 4)}", "linear_eval.epochs=5",
                                  f"linear_eval.batch_size={sizes.batch}")]),
        Part("loss_scaling", 120, [python("-m", "benchmarks.loss_scaling", "--batches", sizes.loss_batches,
                                          "--views", "2,4", "--processes", 1, "--max-logits-gib", 16,
                                          "--out", out / "loss_scaling")]),
    ]
    # the dry run: one recipe, shrunk; the GPU: every paper recipe at its own settings
    cost = ["recipes/paper/selfcon_cifar100_r18.yaml", "--set", "data.image_size=16", "--set", "model.width=8",
            "--set", f"train.precision={sizes.precision}", "--max-batch", 4, "--warmup", 0, "--steps", 1] \
        if args.dry_run else ["recipes/paper", "--warmup", 1, "--steps", 4, "--timeout", 320]
    parts.append(Part("recipe_cost", 360, [python("-m", "benchmarks.recipe_cost", *cost,
                                                  "--out", out / "recipe_cost")]))
    return parts


def run_part(part: Part, deadline: float, logs: Path) -> None:
    """Runs the part's commands in turn under its timeout and what is left of the kit's budget."""
    left = deadline - time.monotonic()
    if left < MIN_PART_SECONDS:
        part.status = "skipped: out of time"
        return
    timeout = min(part.timeout, left)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    started = time.monotonic()
    part.status = "ok"
    with open(logs / f"{part.name}.log", "w") as log:
        for command in part.commands:
            remaining = timeout - (time.monotonic() - started)
            log.write("$ " + " ".join(map(str, command)) + "\n")
            log.flush()
            try:
                proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=max(1.0, remaining))
            except subprocess.TimeoutExpired:
                part.status = f"timed out after {timeout:.0f} s"
                break
            if proc.returncode:
                part.status = (f"failed: exit status {proc.returncode} "
                               f"({Path(command[2 if command[1] == '-m' else 1]).name})")
    part.seconds = time.monotonic() - started
    print(f"[gpu_kit] {part.name:<19} {part.status} [{part.seconds:.0f} s]", flush=True)


def environment(out: Path) -> dict:
    import importlib.metadata
    import torch

    facts = {**machine(), "cuda": torch.version.cuda,
             "bundle": os.environ.get("BUNDLE") or None}  # benchmarks/gpu_bundle.py: packages from elsewhere
    for name in ("torchvision", "accelerate", "timm", "pydantic", "numba", "opencv-python-headless", "ffcv",
                 "nvidia-dali-cuda130", "nvidia-dali-cuda120", "kornia"):
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            facts[name] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        write_text(out / "nvidia-smi.txt", smi.stdout + smi.stderr)
    return facts


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headlines(out: Path) -> dict:
    """The numbers the kit exists for, read back from the parts' result files (None where missing)."""
    found: dict = {}
    for name in ("step_cost", "step_cost_compiled"):
        data = _read(out / name / "step_cost.json")
        for row in (data or {}).get("methods", []):
            if "error" not in row:
                found[f"{name}/{row['method']}"] = {k: row.get(k) for k in (
                    "images_per_second", "step_time_median_s", "peak_memory_bytes", "memory_ratio_to_selfcon",
                    "time_ratio_to_selfcon", "paper_memory_ratio", "paper_time_ratio")}
    for method in ("selfcon", "ce"):
        data = _read(out / f"train_throughput_{method}" / "train_throughput.json")
        for row in (data or {}).get("results", []):
            if row.get("available"):
                found[f"train_throughput/{method}/{row['backend']}"] = {
                    "images_per_second": row["images_per_second"], "ratio_to_synthetic": row.get("ratio_to_synthetic")}
    for stage in ("device", "host"):
        data = _read(out / f"loader_fed_{stage}" / "train_throughput.json")
        for row in (data or {}).get("results", []):
            if row.get("available"):
                found[f"loader_fed/{stage}/{row['backend']}"] = {
                    "images_per_second": row["images_per_second"], "ratio_to_synthetic": row.get("ratio_to_synthetic")}
    for row in (_read(out / "loader_fed_gpu_decode" / "train_throughput.json") or {}).get("results", []):
        if row.get("available") and row["backend"] == "torchvision":
            found["loader_fed/gpu_decode/torchvision"] = {
                "images_per_second": row["images_per_second"], "ratio_to_synthetic": row.get("ratio_to_synthetic")}
    for kind in ("eager", "compiled"):
        bare = _read(out / "bare_loop" / f"{kind}.json")
        if bare:
            found[f"bare_loop/{kind}"] = {"images_per_second": bare["images_per_second"]}
    trainer, bare = found.get("train_throughput/ce/synthetic"), found.get("bare_loop/eager")
    if trainer and bare:
        found["trainer_overhead"] = {"trainer_over_bare": trainer["images_per_second"] / bare["images_per_second"]}
    for row in (_read(out / "recipe_cost" / "recipe_cost.json") or {}).get("recipes", []):
        if row.get("device_hours") is not None:
            found[f"recipe_cost/{Path(row['recipe']).stem}"] = {
                "images_per_second": row["images_per_second"], "device_hours": row["device_hours"]}
    syncs = _read(out / "host_syncs" / "host_syncs.json")
    for row in (syncs or {}).get("methods", []):
        found[f"host_syncs/{row['method']}"] = {"python_reads_per_step": row["python_reads_per_step"],
                                                "cuda_syncs_per_step": row["cuda_syncs_per_step"]}
    return found


def report(out: Path, facts: dict, parts: list[Part], found: dict) -> str:
    head = ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None)
    rows = [[p.name, p.status, f"{p.seconds:.0f}"] for p in parts]
    lines = [f"GPU kit: {head}", "", markdown_table(["part", "status", "seconds"], rows), ""]
    numbers = [[key, ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in value.items() if v is not None)] for key, value in found.items()]
    lines += [markdown_table(["result", "numbers"], numbers)] if numbers else []
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu_<device name>")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, no compilation: the kit's own test on a CPU")
    p.add_argument("--budget", type=float, default=470, help="seconds for all parts together: the parts that do "
                   "not fit are skipped (every part takes about 14 minutes on one H200; --parts runs the rest)")
    p.add_argument("--parts", default=None, help="comma-separated subset of the parts, in the kit's order")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kit: error: --device cuda: no CUDA device is visible (a CPU check: --device cpu --dry-run)",
              file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    gpu = torch.cuda.get_device_name(0).split()[-1].lower() if args.device == "cuda" else "cpu"
    args.out = (args.out or REPO / "benchmarks" / "results" / f"gpu_{gpu}").resolve()
    sizes = DRY if args.dry_run else GPU
    deadline = time.monotonic() + args.budget
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    facts = environment(args.out)
    from fasttrain.selftest import make_folder
    work = args.out / "data"  # made here, removed at the end: nothing to carry to a bare machine
    classes, per_class, val = sizes.photos
    photos = make_folder(work / "photos", classes, per_class, sizes.photo_size, val_per_class=val)
    demo = make_folder(work / "demo", 10, 100 if not args.dry_run else 8, (32, 32),
                       val_per_class=50 if not args.dry_run else 4)
    parts = plan(args, sizes, photos, demo)
    if args.parts:
        wanted = {p.strip() for p in args.parts.split(",")}
        parts = [p for p in parts if p.name in wanted]
    try:
        for part in parts:
            run_part(part, deadline, logs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(args.out / "demo" / "checkpoints", ignore_errors=True)
    found = headlines(args.out)
    write_json(args.out / "kit.json", {"environment": facts, "budget_s": args.budget, "dry_run": args.dry_run,
                                       "parts": [vars(p) | {"commands": [list(map(str, c)) for c in p.commands]}
                                                 for p in parts], "results": found})
    text = report(args.out, facts, parts, found)
    write_text(args.out / "kit.md", text)
    print(text)
    return 1 if any(p.status.startswith(("failed", "timed out")) for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
