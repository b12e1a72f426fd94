"""Step cost of each method (the paper's Table 2 ratios): memory and time of one training step.

    python -m benchmarks.step_cost --arch resnet50 --batch-size 128 --methods ce,supcon,selfcon_m,supcon_s,selfcon

Each method runs in its own fresh process, through the trainer's real step (recipe ->
make_accelerator -> training_model -> build_optimizer -> accelerator.prepare -> TrainStep), on
synthetic images made once on the device before timing: no loading is measured. After warm-up
steps, every timed step is clocked (CUDA events on GPU, perf_counter around a completed step on
CPU). Peak memory: torch.cuda.max_memory_allocated on GPU (everything allocated: weights,
optimizer state, activations, as the paper's GiB/GPU); on CPU the peak resident set above what
the process held once model and optimizer were built (weights excluded, optimizer state and
activations included). The output names which.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.common import (bar_chart, markdown_table, parts_chart, recipe_for, run_worker,  # noqa: E402
                               shown, summarize, synthetic_step, time_steps, write_json, write_report)
from fasttrain.engine.profiling import TRACE_NAME, parts_table  # noqa: E402

METHODS = ("ce", "supcon", "selfcon_m", "supcon_s", "selfcon", "dsn", "cds", "simclr", "selfcon_su", "selfcon_mu",
           "mixco")
LABELS = {"ce": "CE", "supcon": "SupCon", "selfcon_m": "SelfCon-M", "supcon_s": "SupCon-S", "selfcon": "SelfCon",
          "dsn": "DSN", "cds": "CDS", "simclr": "SimCLR", "selfcon_su": "SelfCon-SU", "selfcon_mu": "SelfCon-MU",
          "mixco": "MixCo"}
# the deep-supervision methods run with their recipes' exits (recipes/r*_cds.yaml), whatever --exit-kind
DEEP_SUPERVISION_MODEL = {"exits": ["layer1", "layer2", "layer3"], "exit_kind": "sepconv", "head": "none"}
# Paper Table 2, ImageNet: (memory ratio, time ratio) to SelfCon; CE has none.
PAPER = {
    "resnet18": {"supcon": (1.5, 2.2), "selfcon_m": (1.7, 2.3), "supcon_s": (0.9, 1.0), "selfcon": (1.0, 1.0)},
    "resnet34": {"supcon": (1.5, 2.1), "selfcon_m": (1.7, 2.2), "supcon_s": (0.9, 1.0), "selfcon": (1.0, 1.0)},
    "resnet50": {"supcon": (1.7, 2.1), "selfcon_m": (1.8, 2.2), "supcon_s": (0.9, 0.9), "selfcon": (1.0, 1.0)},
}
NUM_CLASSES = 1000  # ImageNet: the size of CE's classifier and the label range


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (each method gets this many "
                   "images; two-view methods forward twice as many crops)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="the recipes' default, bf16 (fp16 needs a GPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor) through Accelerate")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--exit-kind", default="fc", help="SelfCon's sub-network kind (fc, small, same); dsn and cds "
                   "use their recipes' separable-conv exits after layer1-3")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (torch.set_num_threads); "
                   "default: torch's own choice. On a shared CPU, 1 avoids OpenMP barrier stalls")
    p.add_argument("--rounds", type=int, default=1, help="run the method list this many times, interleaved "
                   "(each run a fresh process), and pool the timed steps: evens out a drifting machine load")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per method and round")
    p.add_argument("--profile", action="store_true", help="after the timed steps, profile --profile-steps more "
                   "with torch.profiler: a trace per method (Perfetto, TensorBoard) and a table of where a step's "
                   "time goes (trunk, sub-networks, heads, loss, gather, backward, optimizer)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/step_cost_<arch>")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1 or args.profile_steps < 1:
        p.error("--warmup must be >= 0, --steps, --rounds and --profile-steps >= 1")
    args.out = (args.out or Path("benchmarks/results") / f"step_cost_{args.arch}").resolve()
    return args


# ---------------------------------------------------------------- one method, in its own process


def measure(args, method_name: str) -> dict:
    """The trainer's own step for one method; returns its timings and peak memory."""
    import torch

    from fasttrain.engine.metrics import PeakMemory

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="step-cost-") as run_dir:
        recipe = recipe_for({
            "method": method_name, "loader": "synthetic",
            "model": {"arch": args.arch, "exits": ["layer2"], "exit_kind": args.exit_kind,
                      **(DEEP_SUPERVISION_MODEL if method_name in ("dsn", "cds") else {})},
            "data": {"image_size": args.image_size, "num_classes": NUM_CLASSES},
            "train": {"batch_size": args.batch_size, "precision": args.precision,
                      "channels_last": args.channels_last, "compile": args.compile},
            "schedule": {"epochs": 1, "warmup_epochs": 0},
            "linear_eval": {"enabled": False},
            "run": {"dir": run_dir, "resume": "never"},
        })
        bench = synthetic_step(recipe, NUM_CLASSES)
        method, accelerator, model, step = bench.method, bench.accelerator, bench.model, bench.step
        device, batch, views, labels = accelerator.device, bench.batch, bench.views, bench.labels

        memory = PeakMemory(device)
        cuda = device.type == "cuda"
        # CPU: the resident-set baseline is taken before the first step, so that the optimizer
        # state and the activations the warm-up leaves cached in the allocator count. GPU: the
        # allocated-bytes peak is absolute, reset after warm-up to leave out compilation.
        if not cuda:
            memory.reset()
        load_before = os.getloadavg()[0]
        for _ in range(args.warmup):
            loss, _ = step(views, labels)
        loss = float(loss) if args.warmup else None
        if cuda:
            memory.reset()
        times, cpu_times = time_steps(step, views, labels, device, args.steps)
        peak = memory.peak_bytes()
        load_after = os.getloadavg()[0]
        params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        profile = profile_steps(args, method_name, step, views, labels, accelerator, model) if args.profile else None

    stats = summarize(times)
    return {
        "method": method.name, "num_views": method.num_views, "uses_subnetwork": method.uses_subnetwork,
        "forward_images_per_image": method.forward_images_per_image,
        "step_time_median_s": stats["median"], "step_time_iqr_s": stats["iqr"],
        "step_time_min_s": stats["min"], "step_time_max_s": stats["max"],
        "images_per_second": batch * accelerator.num_processes / stats["median"],
        "peak_memory_bytes": peak, "memory_kind": memory.kind, "device": str(device),
        "arch": args.arch, "batch_size": args.batch_size, "precision": args.precision,
        "image_size": args.image_size, "channels_last": args.channels_last, "compile": args.compile,
        "exits": list(recipe.model.exits) if method.uses_subnetwork else [],
        "exit_kind": recipe.model.exit_kind if method.uses_subnetwork else None, "parameters": params,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps, "warmup_loss": loss, "step_times_s": times,
        # CPU only: process CPU time per step (all threads) and the machine's 1-minute load average
        # before and after, to tell a slow method from a busy machine
        "step_cpu_times_s": None if cuda else cpu_times, "threads": torch.get_num_threads(),
        "load_average": [load_before, load_after], "profile": profile,
    }


def profile_steps(args, method_name: str, step, views, labels, accelerator, model) -> dict:
    """``--profile-steps`` more steps (after one under the profiler's warm-up) in a torch.profiler window."""
    from fasttrain.engine.profiling import StepProfiler

    plain = None if args.compile else accelerator.unwrap_model(model, keep_torch_compile=False)
    profiler = StepProfiler(accelerator.device, args.out / f"profile_{method_name}", skip=1,
                            steps=args.profile_steps, model=plain)
    with profiler:
        for _ in range(1 + args.profile_steps):
            step(views, labels)
            profiler.step()
    return {"parts_ms_per_step": profiler.parts, "steps": profiler.profiled_steps, "trace": shown(profiler.trace)}


def worker_args(args, method: str) -> list[str]:
    out = ["--method", method, "--arch", args.arch, "--batch-size", args.batch_size, "--precision", args.precision,
           "--image-size", args.image_size, "--warmup", args.warmup, "--steps", args.steps,
           "--exit-kind", args.exit_kind, "--channels-last" if args.channels_last else "--no-channels-last"]
    out += ["--threads", args.threads] if args.threads else []
    out += ["--out", args.out] + (["--profile", "--profile-steps", args.profile_steps] if args.profile else [])
    return out + (["--compile"] if args.compile else [])


# ---------------------------------------------------------------- the report


def add_ratios(rows: list[dict], arch: str) -> None:
    base = next((r for r in rows if r.get("method") == "selfcon" and "error" not in r), None)
    for r in rows:
        paper = PAPER.get(arch, {}).get(r["method"])
        r["paper_memory_ratio"], r["paper_time_ratio"] = paper if paper else (None, None)
        if "error" in r or base is None:
            r["memory_ratio_to_selfcon"] = r["time_ratio_to_selfcon"] = None
            r["cpu_time_ratio_to_selfcon"] = None
            continue
        r["memory_ratio_to_selfcon"] = r["peak_memory_bytes"] / base["peak_memory_bytes"] \
            if base["peak_memory_bytes"] else None
        r["time_ratio_to_selfcon"] = r["step_time_median_s"] / base["step_time_median_s"]
        r["cpu_time_ratio_to_selfcon"] = None
        if r.get("step_cpu_time_median_s") and base.get("step_cpu_time_median_s"):
            r["cpu_time_ratio_to_selfcon"] = r["step_cpu_time_median_s"] / base["step_cpu_time_median_s"]


def _x(v):
    return None if v is None else f"×{v:.2f}"


def _px(v):
    return None if v is None else f"×{v:.1f}"


def table(rows: list[dict], args) -> str:
    ok = [r for r in rows if "error" not in r]
    kind = ok[0]["memory_kind"] if ok else "?"
    device = ok[0]["device"] if ok else "?"
    cpu = any(r.get("cpu_time_ratio_to_selfcon") for r in ok)
    header = ["Method", "Single-View", "Sub-Net.", "Forward imgs/img", "Mem. (ours)", "Time (ours)", "Mem. (paper)",
              "Time (paper)"]
    header += ["Time (ours, CPU s)"] if cpu else []
    header += ["step time, median (IQR) [s]", "images/s", "peak memory [MiB]"]
    body = []
    for r in rows:
        name = LABELS[r["method"]]
        if "error" in r:
            body.append([name, None, None, None, "failed: " + r["error"][:80]] + [None] * (len(header) - 5))
            continue
        body.append([name, "✓" if r["num_views"] == 1 else "", "✓" if r["uses_subnetwork"] else "",
                     f"{r.get('forward_images_per_image', r['num_views']):g}", _x(r["memory_ratio_to_selfcon"]),
                     _x(r["time_ratio_to_selfcon"]),
                     _px(r["paper_memory_ratio"]), _px(r["paper_time_ratio"])]
                    + ([_x(r.get("cpu_time_ratio_to_selfcon"))] if cpu else [])
                    + [f"{r['step_time_median_s']:.3f} ({r['step_time_iqr_s']:.3f})",
                       f"{r['images_per_second']:.1f}", f"{r['peak_memory_bytes'] / 2**20:.0f}"])
    steps = f"{args.warmup} warm-up + {args.steps} timed steps per method" + \
        (f" and round, {args.rounds} interleaved rounds" if args.rounds > 1 else "")
    title = (f"Step cost, {args.arch}, batch {args.batch_size} images of {args.image_size}px, {args.precision}"
             f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}, "
             f"device {device}; {steps}. Ratios to SelfCon; paper: Table 2, ImageNet (batch 1024 on 8 GPUs). "
             f"Memory: {kind}")
    if args.compile and device == "cpu":
        title += " (includes compilation, which happens in the warm-up)"
    title += "."
    if cpu:
        title += " CPU s: process CPU time per step (all threads), less sensitive than wall time to other work."
    return title + "\n\n" + markdown_table(header, body) + "\n"


def chart(rows: list[dict], args, path: Path) -> None:
    rows = [r for r in rows if "error" not in r]
    cats = [LABELS[r["method"]] for r in rows]
    panels = [{"title": f"{what} ratio to SelfCon", "ylabel": "× SelfCon", "categories": cats, "hline": 1.0,
               "series": {"ours": [r[f"{key}_ratio_to_selfcon"] for r in rows],
                          "paper": [r[f"paper_{key}_ratio"] for r in rows]}}
              for what, key in (("Memory", "memory"), ("Time", "time"))]
    kind = rows[0]["memory_kind"] if rows else ""
    bar_chart(path, panels, title=f"{args.arch}, batch {args.batch_size}, {args.image_size}px, {args.precision}, "
                                  f"{rows[0]['device'] if rows else ''} (memory: {kind})")


def merge(runs: list[dict]) -> dict:
    """One row from a method's rounds: timed steps pooled, the largest peak memory."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"method": runs[0]["method"], "error": failed[0]["error"]}
    row = dict(runs[0])
    times = [t for r in runs for t in r["step_times_s"]]
    stats = summarize(times)
    row.update(step_times_s=times, step_time_median_s=stats["median"], step_time_iqr_s=stats["iqr"],
               step_time_min_s=stats["min"], step_time_max_s=stats["max"], rounds=len(runs),
               images_per_second=row["images_per_second"] * row["step_time_median_s"] / stats["median"],
               peak_memory_bytes=max(r["peak_memory_bytes"] for r in runs),
               peak_memory_bytes_per_round=[r["peak_memory_bytes"] for r in runs],
               load_average=[x for r in runs for x in r["load_average"]])
    if row.get("step_cpu_times_s") is not None:
        cpu = [t for r in runs for t in r["step_cpu_times_s"]]
        row.update(step_cpu_times_s=cpu, step_cpu_time_median_s=summarize(cpu)["median"])
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        write_json(args.result, measure(args, args.method))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for round_ in range(args.rounds):
        for method in args.methods:
            started = time.perf_counter()
            row = run_worker("benchmarks.step_cost", worker_args(args, method), timeout=args.timeout)
            row.setdefault("method", method)
            runs[method].append(row)
            tag = f"[step_cost] {method:<9}" + (f" round {round_ + 1}/{args.rounds}" if args.rounds > 1 else "")
            if "error" in row:
                print(f"{tag} FAILED: {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"{tag} {row['step_time_median_s'] * 1000:8.1f} ms/step (IQR "
                      f"{row['step_time_iqr_s'] * 1000:.1f}), {row['images_per_second']:7.1f} img/s, peak "
                      f"{row['peak_memory_bytes'] / 2**20:7.0f} MiB, load {row['load_average'][0]:.1f}"
                      f"  [{time.perf_counter() - started:.0f} s]", flush=True)
    rows = [merge(runs[m]) for m in args.methods]
    add_ratios(rows, args.arch)
    text = table(rows, args)
    profiled = [{"method": LABELS[r["method"]], "parts": r["profile"]["parts_ms_per_step"]}
                for r in rows if r.get("profile")]
    if profiled:
        text += (f"\nWhere a step's time goes ({args.profile_steps} profiled steps per method, ms per step and share; "
                 f"traces: {shown(args.out)}/profile_<method>/{TRACE_NAME}):\n\n" + parts_table(profiled, "method"))
        parts_chart(args.out / "step_cost_parts.png", profiled, "method",
                    title=f"Where a step's time goes: {args.arch}, batch {args.batch_size}, {args.image_size}px")
    write_report(args.out, "step_cost", args, rows, text, worker_only=("method",), rows_key="methods")
    if any("error" not in r for r in rows):
        chart(rows, args, args.out / "step_cost.png")
    print(text)
    print(f"[step_cost] wrote {shown(args.out)}/step_cost.{{json,md,png}}"
          + (" and step_cost_parts.png" if profiled else ""))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
