"""What the benchmarks share: recipes, fresh worker processes, statistics, and result files
(JSON + markdown table + PNG bar chart, each written atomically)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from fasttrain.files import save_figure, write_json, write_text

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- recipes


def recipe_for(tree: dict, overrides: Sequence[str] = ()):
    """A validated Recipe from a ``recipes/*.yaml``-style dict plus dotted ``key=value`` overrides."""
    from fasttrain.recipe import recipe_from_tree

    return recipe_from_tree(tree, overrides, where="benchmark recipe")


def add_loader_options(p) -> None:
    """The loader flags the loader-fed benchmarks share, and the hidden ones of their worker runs."""
    import argparse

    p.add_argument("--colour-stage", choices=("auto", "device", "host"), default="auto",
                   help="data.colour_stage (torchvision, ffcv): colour and normalisation on the device or the host")
    p.add_argument("--decode", choices=("host", "device"), default="host",
                   help="data.decode (torchvision loader): JPEGs decoded by the workers or on the device")
    p.add_argument("--beton-dir", type=Path, default=Path("benchmarks/results/tmp"),
                   help="where --data is converted for ffcv (reused while newer than the folder; git-ignored)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--source", type=Path, help=argparse.SUPPRESS)  # what the backend reads (.beton for ffcv)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)


class SyntheticStep(NamedTuple):
    method: object  # fasttrain.methods.Method
    accelerator: object
    model: object
    step: object  # fasttrain.engine.trainer.TrainStep
    batch: int  # images per process
    views: tuple  # the method's views, made once on the device
    labels: object


def synthetic_step(recipe, num_classes: int) -> SyntheticStep:
    """The trainer's own step for ``recipe`` (``engine.trainer.build_step``, a constant lr: timing, not
    learning), fed random images made once on the device (what a GPU-side loader hands over): no
    loading is measured."""
    import torch

    from fasttrain.engine.trainer import build_step, make_accelerator, per_process_batch
    from fasttrain.methods import get_method

    method = get_method(recipe.method)
    accelerator = make_accelerator(recipe, log_with=())
    device, batch = accelerator.device, per_process_batch(recipe, accelerator)
    step = build_step(recipe, accelerator, method, num_classes)
    model = step.model
    model.train()
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    shape = (batch, 3, recipe.data.image_size, recipe.data.image_size)
    views = tuple(torch.randn(shape, generator=gen, device=device).contiguous(memory_format=fmt)
                  for _ in range(method.num_views))
    labels = torch.randint(0, num_classes, (batch,), generator=gen, device=device)
    return SyntheticStep(method, accelerator, model, step, batch, views, labels)


# ---------------------------------------------------------------- worker processes


def time_steps(step, views, labels, device, steps: int) -> tuple[list[float], Optional[list[float]]]:
    """``steps`` calls of a training step, each timed: CUDA events on a GPU (no host wait between
    steps), wall and process CPU time around a completed step on a CPU (its ops complete before they
    return). Returns (seconds per step, CPU seconds per step or None on a GPU)."""
    import torch

    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step(views, labels)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000 for start, end in events], None
    times, cpu_times = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(views, labels)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    return times, cpu_times


def run_worker(module: str, args: Sequence[str], *, timeout: Optional[float] = None) -> dict:
    """Runs ``python -m module --worker ARGS --result FILE`` in a fresh process; returns the JSON it
    wrote, or ``{"error": ...}`` with the tail of its output when it failed."""
    with tempfile.TemporaryDirectory(prefix="fasttrain-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--worker", *map(str, args), "--result", str(result)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        return {"error": f"exit status {proc.returncode}: " + " | ".join(tail)}


def worker_row(module: str, args: Sequence[str], *, timeout: Optional[float] = None) -> dict:
    """``run_worker``'s result as a table row: a failed worker is an unavailable row with its reason."""
    row = run_worker(module, args, timeout=timeout)
    return {"available": False, "reason": row["error"][:300]} if "error" in row else row


def cpu_model() -> str:
    """The processor's name (``platform.processor()`` gives only the architecture on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def training_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict:
    """Median, inter-quartile range, min and max of a sample."""
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "iqr": q3 - q1, "min": values[0], "max": values[-1]}


# ---------------------------------------------------------------- result files


def shown(path: Path) -> str:
    """A path as results print it: relative to the working directory when it lies under it."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_report(out: Path, name: str, args, rows: list[dict], text: str, *, worker_only=(),
                 rows_key: str = "results") -> None:
    """``out/<name>.json`` (config = the CLI arguments less the worker-only ones, environment, rows)
    and ``out/<name>.md`` (the table)."""
    config = {k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("worker", "result", *worker_only)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", {"benchmark": name, "config": config, "environment": environment(),
                                      rows_key: rows})
    write_text(out / f"{name}.md", text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(path: Path, panels: Sequence[dict], title: str = "") -> None:
    """Grouped bars, one panel each: ``{"title", "ylabel", "categories": [..], "series": {name: [v|None]}}``.
    Missing values (None) leave a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        categories, series = panel["categories"], panel["series"]
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
            bars = ax.bar([x for x, v in zip(xs, values) if v is not None],
                          [v for v in values if v is not None], width, label=name)
            ax.bar_label(bars, fmt=panel.get("fmt", "%.2f"), fontsize=7)
        ax.set_xticks(range(len(categories)), categories, rotation=panel.get("rotation", 0))
        ax.set_title(panel.get("title", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="grey", linewidth=0.8, linestyle="--")
        if len(series) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def parts_chart(path: Path, rows: Sequence[dict], label: str, title: str = "") -> None:
    """One stacked horizontal bar per row: ms per step of each part (``fasttrain.engine.profiling.PARTS``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fasttrain.engine.profiling import PARTS

    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.8))
    names = [str(r[label]) for r in rows]
    left = [0.0] * len(rows)
    for part in PARTS:
        values = [r["parts"][part] for r in rows]
        if any(values):
            ax.barh(names, values, left=left, label=part)
            left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- datasets


def ffcv_dataset(data_dir: Path, out_dir: Path) -> tuple[Path, Optional[float]]:
    """``data_dir`` converted to ``out_dir/<name>.beton`` by ``loaders.ffcv_convert.convert`` (kept and
    reused when it is newer than the folder). Returns (path, seconds spent converting or None)."""
    import time

    from loaders.ffcv_convert import convert  # ImportError: the backend is not there

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    beton = out_dir / f"{data_dir.resolve().name}.beton"
    newest = max((p.stat().st_mtime for p in data_dir.rglob("*") if p.is_file()), default=0)
    if beton.is_file() and beton.stat().st_mtime >= newest:
        return beton, None
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    convert(data_dir, beton)
    return beton, time.perf_counter() - start


def backend_source(backend: str, data_dir: Path, beton_dir: Path) -> tuple[Path, Optional[float], Optional[str]]:
    """What a backend reads: the folder, or for ffcv the folder converted once to a .beton.
    Returns (source, seconds spent converting or None, reason it is unavailable or None)."""
    if backend != "ffcv":
        return data_dir, None, None
    try:
        source, seconds = ffcv_dataset(data_dir, beton_dir)
    except Exception as exc:  # not installed, or the conversion failed: this backend only, not the run
        return data_dir, None, f"ffcv conversion: {type(exc).__name__}: {exc}".splitlines()[0]
    return source, seconds, None
