"""Host reads per training step: how often a step waits for the device when its logs are not read.

    python -m benchmarks.host_syncs --methods ce,supcon,selfcon,cds,mixco [--arch resnet18 --image-size 32]

A host read (``.item()``, ``bool()``, ``float()``, ``.tolist()`` of a tensor, or an op whose output
shape depends on the data, such as ``torch.unique``) stalls the CPU until the GPU has caught up: the
queue of launched kernels drains, and the step cannot be captured as a CUDA graph. Counted two ways
over ``--steps`` unlogged steps of the trainer's own step (after ``--warmup``):

* ``python_reads``: the Tensor methods and data-dependent torch functions called from Python,
  patched to count (any device; what the trainer's own code asks for);
* ``cuda_syncs`` (CUDA only): the synchronisations ``torch.cuda.set_sync_debug_mode("warn")``
  reports, inside libraries too.

The step's size does not change the count: the defaults are small.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path


from benchmarks.common import markdown_table, recipe_for, synthetic_step  # noqa: E402
from fasttrain.files import write_json, write_text  # noqa: E402

TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
DATA_DEPENDENT = ("unique", "nonzero", "masked_select", "bincount", "unique_consecutive")
METHODS = ("ce", "supcon", "supcon_s", "selfcon", "selfcon_m", "dsn", "cds", "simclr", "mixco")


@contextlib.contextmanager
def counting_reads(counter: Counter):
    """Counts host reads made from Python while active, by the name of what was called and where."""
    import torch

    saved = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]  # the caller
            counter[f"{name} ({Path(frame.filename).name}:{frame.lineno})"] += 1
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, counted)

    for name in TENSOR_READS:
        wrap(torch.Tensor, name)
    for name in DATA_DEPENDENT:
        wrap(torch, name)
        if hasattr(torch.Tensor, name):
            wrap(torch.Tensor, name)
    try:
        yield counter
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@contextlib.contextmanager
def counting_cuda_syncs(counter: Counter, device):
    """CUDA synchronisations the sync debug mode reports (nothing on other devices)."""
    import torch

    if device.type != "cuda":
        yield counter
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            counter[str(w.message).splitlines()[0][:120]] += 1


def count(method: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="host-syncs-") as run_dir:
        recipe = recipe_for({
            "method": method, "loader": "synthetic",
            "model": {"arch": args.arch, "stem": "cifar" if args.image_size < 64 else "imagenet",
                      "exits": ["layer2"] if method not in ("dsn", "cds") else ["layer1", "layer2", "layer3"],
                      "exit_kind": "fc" if method not in ("dsn", "cds") else "sepconv", "width": args.width},
            "data": {"image_size": args.image_size, "num_classes": 10},
            "train": {"batch_size": args.batch_size, "precision": args.precision, "channels_last": True},
            "schedule": {"epochs": 1, "warmup_epochs": 0}, "linear_eval": {"enabled": False},
            "run": {"dir": run_dir, "resume": "never"}, **getattr(args, "overrides", {})})
        bench = synthetic_step(recipe, 10)
        for _ in range(args.warmup):
            bench.step(bench.views, bench.labels)
        reads, syncs = Counter(), Counter()
        with counting_reads(reads), counting_cuda_syncs(syncs, bench.accelerator.device):
            for _ in range(args.steps):
                bench.step(bench.views, bench.labels)  # measure=False: logs not read
        if bench.accelerator.device.type == "cuda":
            import torch
            torch.cuda.synchronize()
    cuda = bench.accelerator.device.type == "cuda"
    return {"method": method, "device": str(bench.accelerator.device), "steps": args.steps,
            "python_reads_per_step": sum(reads.values()) / args.steps,
            "python_reads": dict(reads.most_common()),
            "cuda_syncs_per_step": sum(syncs.values()) / args.steps if cuda else None,
            "cuda_syncs": dict(syncs.most_common()) if cuda else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16, help="model.width (the count does not depend on it)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="write host_syncs.json and host_syncs.md here")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return args


def table(rows: list[dict]) -> str:
    body = [[r["method"], f"{r['python_reads_per_step']:g}",
             "–" if r["cuda_syncs_per_step"] is None else f"{r['cuda_syncs_per_step']:g}",
             "; ".join(f"{k} ×{v}" for k, v in list(r["python_reads"].items())[:4])] for r in rows]
    return markdown_table(["method", "Python host reads / step", "CUDA syncs / step", "where"], body) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate.state import AcceleratorState, GradientState

    rows = []
    for method in args.methods:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        rows.append(count(method, args))
        print(f"[host_syncs] {method:<9} {rows[-1]['python_reads_per_step']:g} Python host reads per step"
              + ("" if rows[-1]["cuda_syncs_per_step"] is None else
                 f", {rows[-1]['cuda_syncs_per_step']:g} CUDA syncs per step"), flush=True)
    text = (f"Host reads per unlogged training step ({args.arch}, batch {args.batch_size}, {args.precision}, "
            f"{rows[0]['device'] if rows else '?'}; {args.steps} steps after {args.warmup} warm-up):\n\n" + table(rows))
    print(text)
    if args.out:
        write_json(args.out / "host_syncs.json", {"benchmark": "host_syncs", "config": vars(args), "methods": rows})
        write_text(args.out / "host_syncs.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
