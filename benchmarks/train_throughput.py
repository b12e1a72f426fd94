"""The real trainer fed by each loader backend, against the same trainer fed synthetic images.

    python -m benchmarks.train_throughput --data /tmp/photos --arch resnet18 --backends synthetic,torchvision,dali,ffcv

Each backend runs ``fasttrain.engine.trainer.train`` in its own fresh process: --skip steps left
out, then at least --steps timed steps (as many epochs as that takes; the clock stops at epoch
ends), no linear evaluation, the run directory in a temporary folder. images/s is the
TrainResult's (the trainer's Throughput, ``monitor.throughput_skip_steps`` = --skip).

Prefetch: a loader holds batches decoded before the timed window opens (torchvision: workers x
prefetch factor 4, DALI: its queue of 2, ffcv: 3 batches ahead). The default --skip is 3 warm-up
steps plus that depth, so the queue has been drained once when the clock starts; the timed
window may still consume at most one queue of batches decoded before it, which overstates the
loader's rate by at most depth / timed steps: reported as ``prefetch_bias_bound`` (the default 40
timed steps keep it at <= 20% for 2 torchvision workers, <= 8% for DALI and ffcv; raise --steps on
a GPU, where steps are cheap).
``synthetic`` makes random images on the device (no decoding, no copy): the trainer's upper
bound. ratio = backend images/s / synthetic images/s; 1 - ratio is the share of the step the
loader costs (decoding that the step waits for, or CPU taken from the step).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.common import (add_loader_options, backend_source, bar_chart, markdown_table, parts_chart,  # noqa: E402
                               recipe_for, worker_row, write_json, write_report)
from fasttrain.engine.profiling import TRACE_NAME, parts_table  # noqa: E402

BACKENDS = ("synthetic", "torchvision", "dali", "ffcv")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an ImageFolder directory (class folders of images)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--method", default="selfcon")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=40, help="timed training steps (after --skip)")
    p.add_argument("--skip", type=int, default=None, help="steps left out before the clock starts (default: 3 "
                   "warm-up steps + the loader's prefetch depth)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the recipes' default (on)")
    p.add_argument("--compile", action="store_true", help="train.compile (the warm-up steps include compiling)")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the training process")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per backend")
    p.add_argument("--profile", action="store_true", help="per backend, a second run with a torch.profiler window "
                   "(monitor.profile) over --profile-steps steps after --skip: a trace and a table of where a step's "
                   "time goes (waiting for data, trunk, sub-networks, heads, loss, backward, optimizer)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/train_throughput_<arch>")
    add_loader_options(p)
    p.add_argument("--num-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)  # images in --data
    p.add_argument("--profile-run", action="store_true", help=argparse.SUPPRESS)  # this worker profiles
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.steps < 1 or args.profile_steps < 1:
        p.error("--steps and --profile-steps must be >= 1")
    if not args.worker and not args.data.is_dir():
        p.error(f"--data: no such directory: {args.data}")
    args.out = (args.out or Path("benchmarks/results") / f"train_throughput_{args.arch}").resolve()
    return args


def num_classes(folder: Path) -> int:
    return sum(1 for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def count_images(folder: Path) -> int:
    return sum(1 for p in Path(folder).glob("*/*") if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------- one backend, in its own process


def measure(args) -> dict:
    import torch

    from fasttrain.engine.trainer import make_accelerator, train
    from loaders import DataConfig, LoaderError, prefetch_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic = args.backend == "synthetic"
    depth = prefetch_batches(args.backend, DataConfig(num_workers=args.workers))
    skip = 3 + depth if args.skip is None else args.skip
    # a profiled run is a run of its own: the profiler's overhead never reaches the timed rate
    total = skip + (args.profile_steps if args.profile_run else args.steps)
    per_epoch = total if synthetic else args.images // args.batch_size
    epochs = -(-total // per_epoch)
    row = {"backend": args.backend, "arch": args.arch, "method": args.method, "batch_size": args.batch_size,
           "image_size": args.image_size, "precision": args.precision, "channels_last": args.channels_last,
           "workers": args.workers, "compile": args.compile, "colour_stage": args.colour_stage,
           "decode": args.decode if args.backend == "torchvision" else "host",
           "prefetch_batches": depth, "skipped_steps": skip,
           "timed_steps": epochs * min(per_epoch, total) - skip, "epochs": epochs}
    row["prefetch_bias_bound"] = depth / row["timed_steps"]
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as run_dir:
        recipe = recipe_for({
            "method": args.method, "loader": args.backend, "model": {"arch": args.arch, "exits": ["layer2"]},
            "data": {"train": None if synthetic else str(args.source), "image_size": args.image_size,
                     "num_workers": args.workers, "augment": "contrastive", "crop_scale": [0.2, 1.0],
                     "colour_stage": args.colour_stage,
                     "decode": args.decode if args.backend == "torchvision" else "host",
                     # synthetic: as many classes as the folder, enough samples for every step
                     **({"num_classes": args.num_classes, "synthetic_samples": args.batch_size * total}
                        if synthetic else {})},
            "train": {"batch_size": args.batch_size, "precision": args.precision, "channels_last": args.channels_last,
                      "compile": args.compile,
                      "max_steps_per_epoch": min(per_epoch, total), "log_every": min(per_epoch, total)},
            "schedule": {"epochs": epochs, "warmup_epochs": 0},
            "linear_eval": {"enabled": False},
            # the epoch-end k-NN is evaluation, not training throughput
            "monitor": {"knn_every": 0, "throughput_skip_steps": skip,
                        **({"profile": {"skip": skip, "steps": args.profile_steps,
                                        "dir": str(args.out / f"profile_{args.backend}")}}
                           if args.profile_run else {})},
            "run": {"dir": run_dir, "resume": "never"},
        })
        accelerator = make_accelerator(recipe, log_with=())
        start = time.perf_counter()
        try:
            result = train(recipe, accelerator)
        except (LoaderError, ImportError) as exc:
            return {**row, "available": False, "reason": str(exc).splitlines()[0]}
        wall = time.perf_counter() - start
        accelerator.end_training()
    if args.profile_run:
        return {**row, "available": result.profile is not None, "profile": result.profile,
                "reason": None if result.profile else "the profiled window did not complete"}
    return {**row, "available": True, "reason": None, "device": str(accelerator.device),
            "images_per_second": result.images_per_second, "updates": result.updates,
            "peak_memory_bytes": result.peak_memory_bytes, "memory_kind": result.peak_memory_kind,
            # CUDA: what the GPU holds in all, DALI's pool and outputs included: the comparable number
            "device_memory_bytes": result.device_memory_bytes,
            "train_wall_seconds": wall, "threads": torch.get_num_threads()}


def worker_args(args, backend: str, source: Path, classes: int) -> list:
    out = ["--data", args.data, "--backend", backend, "--source", source, "--num-classes", classes,
           "--images", count_images(args.data), "--arch", args.arch, "--method", args.method,
           "--batch-size", args.batch_size, "--image-size", args.image_size, "--steps", args.steps,
           "--precision", args.precision, "--channels-last" if args.channels_last else "--no-channels-last",
           "--workers", args.workers, "--colour-stage", args.colour_stage,
           "--decode", args.decode] + (["--compile"] if args.compile else [])
    return out + (["--threads", args.threads] if args.threads else []) + \
        (["--skip", args.skip] if args.skip is not None else []) + \
        ["--out", args.out, "--profile-steps", args.profile_steps]


# ---------------------------------------------------------------- the report


def table(rows: list[dict], args) -> str:
    header = ["Backend", "images/s", "× synthetic", "loader share of the step", "skipped + timed steps",
              "prefetch bias bound", "peak memory [MiB]", "notes"]
    body = []
    for r in rows:
        if not r.get("available"):
            body.append([r["backend"], "unavailable", None, None, None, None, None, (r.get("reason") or "")[:160]])
            continue
        ratio = r.get("ratio_to_synthetic")
        body.append([r["backend"], f"{r['images_per_second']:.1f}", None if ratio is None else f"×{ratio:.2f}",
                     None if ratio is None else f"{max(0.0, 1 - ratio):.0%}",
                     f"{r['skipped_steps']} + {r['timed_steps']}", f"{r['prefetch_bias_bound']:.0%}",
                     f"{(r.get('device_memory_bytes') or r['peak_memory_bytes']) / 2**20:.0f}", None])
    ok = [r for r in rows if r.get("available")]
    device = ok[0]["device"] if ok else "?"
    kind = ok[0]["memory_kind"] if ok else "?"
    if ok and ok[0].get("device_memory_bytes"):
        kind = "the whole device's peak used memory (torch.cuda.mem_get_info at logged steps: every allocator)"
    title = (f"Trainer throughput, {args.method} / {args.arch}, batch {args.batch_size}, {args.image_size}px, "
             f"{args.precision}{', channels_last' if args.channels_last else ''}, device {device}, "
             f"{args.workers} loader workers, >= {args.steps} timed steps after warm-up and prefetch; "
             f"data {args.data}. Memory: {kind}.")
    return title + "\n\n" + markdown_table(header, body) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        write_json(args.result, measure(args))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    classes = num_classes(args.data)
    rows = []
    for backend in args.backends:
        source, conversion, reason = backend_source(backend, args.data, args.beton_dir)
        if reason:
            rows.append({"backend": backend, "available": False, "reason": reason})
            print(f"[train_throughput] {backend}: unavailable ({reason})", flush=True)
            continue
        started = time.perf_counter()
        row = worker_row("benchmarks.train_throughput", worker_args(args, backend, source, classes),
                         timeout=args.timeout)
        row.update(backend=backend, conversion_seconds=conversion)
        rows.append(row)
        if row["available"]:
            print(f"[train_throughput] {backend:<11} {row['images_per_second']:8.1f} images/s  "
                  f"[{time.perf_counter() - started:.0f} s]", flush=True)
        else:
            print(f"[train_throughput] {backend:<11} unavailable ({row['reason']})", flush=True)
        if args.profile and row["available"]:
            profiled = worker_row("benchmarks.train_throughput",
                                  worker_args(args, backend, source, classes) + ["--profile-run"], timeout=args.timeout)
            row["profile"] = profiled.get("profile")
            print(f"[train_throughput] {backend:<11} profiled: " + (
                f"{row['profile']['parts_ms_per_step']['step']:.0f} ms per step, "
                f"{row['profile']['parts_ms_per_step']['data']:.0f} ms of it waiting for data"
                if row["profile"] else f"failed ({profiled.get('reason')})"), flush=True)
    base = next((r for r in rows if r["backend"] == "synthetic" and r.get("available")), None)
    for r in rows:
        r["ratio_to_synthetic"] = (r["images_per_second"] / base["images_per_second"]
                                   if base and r.get("available") else None)
    text = table(rows, args)
    profiled = [{"backend": r["backend"], "parts": r["profile"]["parts_ms_per_step"]} for r in rows if r.get("profile")]
    if profiled:
        text += (f"\nWhere a step's time goes ({args.profile_steps} profiled steps per backend in a run of its own, "
                 f"ms per step and share; traces: {args.out}/profile_<backend>/{TRACE_NAME}):\n\n"
                 + parts_table(profiled, "backend"))
        parts_chart(args.out / "train_throughput_parts.png", profiled, "backend",
                    title=f"Where a step's time goes: {args.method} / {args.arch}, batch {args.batch_size}")
    write_report(args.out, "train_throughput", args, rows, text,
                 worker_only=("backend", "source", "num_classes", "images", "profile_run"))
    names = [r["backend"] for r in rows]
    bar_chart(args.out / "train_throughput.png", [
        {"title": "Trainer images/s", "ylabel": "images / s", "categories": names, "fmt": "%.1f",
         "series": {"images/s": [r.get("images_per_second") for r in rows]}},
        {"title": "× synthetic (1 = the loader costs nothing)", "ylabel": "ratio", "categories": names,
         "hline": 1.0, "series": {"ratio": [r.get("ratio_to_synthetic") for r in rows]}}],
        title=f"{args.method} / {args.arch}, batch {args.batch_size}, {args.image_size}px, {args.precision}")
    print(text)
    print(f"[train_throughput] wrote {args.out}/train_throughput.{{json,md,png}}")
    return 0 if base is not None else 1


if __name__ == "__main__":
    sys.exit(main())
