r"""How the contrastive loss grows with the global batch: time and peak memory of ``supcon_loss``
(forward + backward) per process, against global batch, columns (views x exits) and processes.

    python -m benchmarks.loss_scaling --batches 256,512,1024,2048,4096,8192 --views 2,4 --processes 1,2
    python -m benchmarks.loss_scaling ... --label after \
        --compare benchmarks/results/loss_scaling_before/loss_scaling.json

Every configuration runs in a fresh worker (several processes: a gloo group on CPU, NCCL on GPUs;
on CPU each process gets ``--threads`` threads, 1 by default, so that a process stands for one device
and 1 and 2 processes compare at equal compute per process), on random L2-normalised features
``[B_global / world, V, 128]`` per process and 100 classes. Time is
the median of the timed repeats, the slowest process (barriers around each repeat; CUDA events on a
GPU); memory is each process's peak above what it held before the first call (resident set on CPU,
``max_memory_allocated`` on a GPU), the largest over processes, next to the size of one logits matrix
of the process (``B_local*A x B_global*V`` floats). Configurations whose logits matrix would exceed
``--max-logits-gib`` are skipped and listed. The table gives the fitted exponent of time and memory
in the global batch (log-log least squares over the batches >= 1024).
"""
from __future__ import annotations

import argparse
import math
import socket
import sys
import time
from pathlib import Path


from benchmarks.common import markdown_table, summarize, worker_row, write_report  # noqa: E402
from fasttrain.files import save_figure  # noqa: E402

DIM, CLASSES = 128, 100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="256,512,1024,2048,4096,8192", help="global batch sizes")
    p.add_argument("--views", default="2,4", help="feature columns per image (views x exits), all anchors")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-logits-gib", type=float, default=2.0, help="skip larger configurations")
    p.add_argument("--label", default="current", help="name of this code version in the report")
    p.add_argument("--compare", type=Path, help="an earlier run's loss_scaling.json to show beside this one")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (each process stands for one device: give each its own cores)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_scaling"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--columns", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("batches", "views", "processes"):
        try:
            setattr(args, key, [int(v) for v in getattr(args, key).split(",") if v.strip()])
        except ValueError:
            p.error(f"--{key}: a comma-separated list of integers")
    if any(b % w for b in args.batches for w in args.processes):
        p.error("--batches: every batch must divide by every --processes value")
    return args


def logits_bytes(batch: int, columns: int, world: int) -> int:
    return (batch // world) * columns * batch * columns * 4


# ---------------------------------------------------------------- one configuration, in its own processes


def _measure(rank: int, world: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from fasttrain.engine.metrics import PeakMemory
    from fasttrain.losses import supcon_loss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    gen = torch.Generator(device=device).manual_seed(rank)
    local = args.batch // world
    raw = torch.randn(local, args.columns, DIM, generator=gen, device=device)
    labels = torch.randint(0, CLASSES, (local,), generator=gen, device=device)
    memory = PeakMemory(device)
    memory.reset()
    times = []
    for i in range(args.repeats + 1):  # the first call warms up
        features = F.normalize(raw, dim=-1).requires_grad_()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        supcon_loss(features, labels).backward()
        if cuda:
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()
        if i:
            times.append(time.perf_counter() - start)
    peak = memory.peak_above_reset()  # what the loss added above its inputs, on either device
    # on the device: an NCCL group reduces only GPU tensors
    worst = torch.tensor([max(times), float(peak)], dtype=torch.float64, device=device)
    if world > 1:
        stats = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # repeat by repeat, the slowest process
        times = stats.tolist()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        queue.put({"times": times, "peak": int(worst[1]), "kind": memory.kind + ("_above_inputs" if cuda else "")})


def worker(args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_measure, args=(r, args.world, port, args, queue)) for r in range(args.world)]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=args.timeout)
    for proc in procs:
        proc.join()
    stats = summarize(result["times"])
    return {"batch": args.batch, "columns": args.columns, "processes": args.world,
            "time_median_s": stats["median"], "time_iqr_s": stats["iqr"], "times_s": result["times"],
            "peak_memory_bytes": result["peak"], "memory_kind": result["kind"],
            "logits_bytes": logits_bytes(args.batch, args.columns, args.world)}


# ---------------------------------------------------------------- the report


def exponent(rows: list[dict], key: str) -> float | None:
    points = [(math.log(r["batch"]), math.log(r[key])) for r in rows if r["batch"] >= 1024 and r.get(key)]
    if len(points) < 2:
        return None
    mx, my = (sum(p[i] for p in points) / len(points) for i in (0, 1))
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def series(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        if "error" not in r and "skipped" not in r:
            groups.setdefault((r["processes"], r["columns"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["batch"]) for k, v in sorted(groups.items())}


def report(args, rows: list[dict], before: tuple[str, list[dict]] | None) -> str:
    mib = 2 ** 20
    table = []
    for r in rows:
        if "skipped" in r or "error" in r:
            table.append([r["processes"], r["columns"], r["batch"], None, None, None, None,
                          r.get("skipped") or r["error"][:80]])
            continue
        table.append([r["processes"], r["columns"], r["batch"], f"{r['time_median_s'] * 1000:.1f}",
                      f"{r['peak_memory_bytes'] / mib:.0f}", f"{r['logits_bytes'] / mib:.0f}",
                      f"{r['peak_memory_bytes'] / r['logits_bytes']:.2f}", ""])
    text = [f"# supcon_loss scaling ({args.label})", "",
            markdown_table(["processes", "columns V", "global batch", "time per process (ms)",
                            "peak memory per process (MiB)", "one logits matrix (MiB)", "peak / logits", "note"],
                           table), "", "Fitted exponents (log-log, global batch >= 1024):", ""]
    fits = []
    for version, data in ((args.label, rows), before or ("", [])):
        for (world, columns), group in series(data).items():
            t, m = exponent(group, "time_median_s"), exponent(group, "peak_memory_bytes")
            fits.append([version, world, columns, None if t is None else f"{t:.2f}",
                         None if m is None else f"{m:.2f}"])
    text.append(markdown_table(["code", "processes", "columns V", "time exponent", "memory exponent"], fits))
    return "\n".join(text) + "\n"


def plot(path: Path, rows: list[dict], before: tuple[str, list[dict]] | None, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours: dict = {}  # one colour per (processes, V); the earlier run dashed beside this one
    for (version, data), style in (((label, rows), "-"), (before or ("", []), "--")):
        for key, group in series(data).items():
            colour = colours.setdefault(key, f"C{len(colours)}")
            xs = [r["batch"] for r in group]
            name = f"{version}: {key[0]} proc, V={key[1]}"
            axes[0].loglog(xs, [r["time_median_s"] * 1000 for r in group], style, color=colour, marker="o", label=name)
            axes[1].loglog(xs, [r["peak_memory_bytes"] / 2 ** 20 for r in group], style, color=colour, marker="o",
                           label=name)
    for ax, ylabel in zip(axes, ("time per process (ms)", "peak memory per process (MiB)")):
        ax.set_xlabel("global batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("supcon_loss forward + backward per process", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        from fasttrain.files import write_json
        write_json(args.result, worker(args))
        return 0
    from tqdm import tqdm

    before = None
    if args.compare:
        import json
        earlier = json.loads(args.compare.read_text())
        before = (earlier["config"]["label"], earlier["results"])
    configs = [(w, c, b) for w in args.processes for c in args.views for b in args.batches]
    rows = []
    bar = tqdm(configs, desc="loss scaling", unit="config")
    for world, columns, batch in bar:
        bar.set_postfix(processes=world, V=columns, batch=batch)
        size = logits_bytes(batch, columns, world)
        if size > args.max_logits_gib * 2 ** 30:
            rows.append({"batch": batch, "columns": columns, "processes": world,
                         "skipped": f"logits {size / 2 ** 30:.1f} GiB > --max-logits-gib {args.max_logits_gib}"})
            continue
        row = worker_row("benchmarks.loss_scaling", ["--batch", batch, "--columns", columns, "--world", world,
                                                      "--repeats", args.repeats, "--threads", args.threads,
                                                      "--timeout", args.timeout],
                         timeout=args.timeout)
        if "reason" in row:  # the worker failed: its reason, in the table
            row = {"error": row["reason"]}
        rows.append({"batch": batch, "columns": columns, "processes": world, **row})
    text = report(args, rows, before)
    write_report(args.out, "loss_scaling", args, rows, text, worker_only=("batch", "columns", "world"))
    plot(args.out / "loss_scaling.png", rows, before, args.label)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
