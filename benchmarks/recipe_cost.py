"""Expected device-hours of each recipe: the GPU-hours column of docs/reproduce.md.

    python -m benchmarks.recipe_cost recipes/paper --out benchmarks/results/recipe_cost

Each recipe's own training step (its method, model, exits, loss options, image size, optimizer and
train settings; ``engine.trainer.build_step`` through ``benchmarks.common.synthetic_step``) is timed
on synthetic images made once on the device: no loading, which the GPU kit's ``loader_fed`` part
measures. Recipes whose steps are alike (their datasets, schedules, learning rates and, for a method
without a classifier, class counts apart) are timed once, the settings of the largest jobs first. A
step takes the recipe's batch on one device (at most ``--max-batch`` images), halved until it fits
the device's memory (an 8-GPU recipe's 2,048 two-view ResNet-50 images do not fit one GPU: the rate
at the batch that fits stands for it).

    device-hours = images per epoch × epochs ÷ images/s ÷ 3,600

for the pretraining alone: the linear evaluation (a frozen encoder) and loading come on top. The
images per epoch are the training split's of the dataset the recipe reads (``DATASETS``, by the
name of ``data.train``'s parent folder; ``--images NAME=N`` adds or replaces one). The JSON and the
table are rewritten after every setting, so a run stopped by ``--timeout`` (or killed) keeps what
it measured; the settings left are marked not timed.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks.common import markdown_table, shown, summarize, synthetic_step, time_steps, write_report

# training images and classes of the datasets the paper recipes read (ImageNet-100: CMC's 100 classes)
DATASETS = {"cifar10": (50_000, 10), "cifar100": (50_000, 100), "tinyimagenet": (100_000, 200),
            "imagenet": (1_281_167, 1000), "imagenet100": (126_689, 100)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+", type=Path, help="recipe files or folders (their *.yaml, bases "
                   "'_*.yaml' and official.yaml left out)")
    p.add_argument("--max-batch", type=int, default=1024, help="images per timed step at most")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", action="append", default=[], metavar="NAME=N",
                   help="training images of a dataset folder name (adds to or replaces DATASETS)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every recipe (e.g. data.image_size=16 for a dry run)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for all the timing: settings not "
                   "started by then are left untimed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/recipe_cost"))
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--max-batch and --steps must be >= 1, --warmup >= 0")
    datasets = dict(DATASETS)
    for entry in args.images:
        name, _, count = entry.partition("=")
        if not count.isdigit() or not name:
            p.error(f"--images {entry!r}: expected NAME=N, e.g. imagenet=1281167")
        datasets[name] = (int(count), datasets.get(name, (0, 1000))[1])
    args.datasets = datasets
    return args


def recipe_files(paths) -> list[Path]:
    files = []
    for path in paths:
        found = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
        files += [f for f in found if not f.name.startswith("_") and f.name != "official.yaml"]
    return files


def dataset_of(recipe) -> str:
    """The dataset a recipe trains on, by its training folder's parent: /data/cifar100/train -> cifar100."""
    train = Path(str(recipe.data.train or ""))
    return train.parent.name.replace("-", "").replace("_", "").lower()


def plan(args) -> list[dict]:
    """One entry per recipe: its dataset, epochs, and the step it times (as a dict of recipe sections)."""
    from fasttrain.methods import get_method
    from fasttrain.recipe import load_recipe

    entries = []
    for path in recipe_files(args.recipes):
        recipe = load_recipe(path, args.set)
        dataset = dataset_of(recipe)
        images, classes = args.datasets.get(dataset, (None, 1000))
        if get_method(recipe.method).classifiers == "none":  # the class count only draws the labels
            classes = 1000
        step = {"method": recipe.method, "model": recipe.model.model_dump(mode="json"),
                "loss": recipe.loss.model_dump(mode="json", exclude_unset=True),
                "optim": recipe.optim.model_dump(mode="json"),
                "train": {**recipe.train.model_dump(mode="json"),
                          "batch_size": min(recipe.train.batch_size, args.max_batch)},
                "image_size": recipe.data.image_size, "num_classes": classes}
        entries.append({"recipe": str(path), "dataset": dataset, "images_per_epoch": images,
                        "epochs": recipe.schedule.epochs, "recipe_batch": recipe.train.batch_size,
                        "step": step, "key": step_key(step)})
    return entries


def step_key(step: dict) -> str:
    """What makes two steps cost alike: everything but the optimizer's values and the bookkeeping."""
    optim = {k: v for k, v in step["optim"].items() if k not in ("lr", "momentum", "weight_decay")}
    optim["clip_grad_norm"] = optim["clip_grad_norm"] is not None
    train = {k: step["train"][k] for k in ("batch_size", "grad_accum_steps", "precision", "channels_last", "compile",
                                           "cudnn_benchmark")}
    return json.dumps({**step, "optim": optim, "train": train}, sort_keys=True)


def settings(entries: list[dict]) -> dict:
    """The distinct steps, the one behind the largest job (images × epochs) first."""
    weight: dict = {}
    for e in entries:
        weight[e["key"]] = max(weight.get(e["key"], 0), (e["images_per_epoch"] or 0) * e["epochs"])
    first = {e["key"]: e["step"] for e in entries}
    return {key: first[key] for key in sorted(first, key=lambda k: -weight[k])}


# ---------------------------------------------------------------- the timing


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's allocator, or cuBLAS/cuDNN failing to allocate their workspace."""
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text))


def measure(step: dict, args) -> dict:
    """Images/s of one step setting, its batch halved until it fits (BatchNorm needs two images)."""
    import torch

    batch = step["train"]["batch_size"]
    while True:
        try:
            return {**time_step({**step, "train": {**step["train"], "batch_size": batch}}, args),
                    "measured_batch": batch}
        except Exception as exc:
            if not out_of_memory(exc) or batch <= 2:
                raise
            batch //= 2
        finally:
            if step["train"]["compile"]:
                torch._dynamo.reset()  # the next setting compiles afresh, within dynamo's recompile limit
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def time_step(step: dict, args) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from benchmarks.common import recipe_for

    AcceleratorState._reset_state(reset_partial_state=False)  # each setting its own precision
    GradientState._reset_state()
    with tempfile.TemporaryDirectory(prefix="recipe-cost-") as run_dir:
        recipe = recipe_for({
            "method": step["method"], "loader": "synthetic", "model": step["model"], "loss": step["loss"],
            "optim": step["optim"], "train": step["train"],
            "data": {"image_size": step["image_size"], "num_classes": step["num_classes"]},
            "schedule": {"epochs": 1, "warmup_epochs": 0},
            "linear_eval": {"enabled": False}, "run": {"dir": run_dir, "resume": "never"}})
        bench = synthetic_step(recipe, step["num_classes"])
        for _ in range(args.warmup):
            bench.step(bench.views, bench.labels)
        times, _ = time_steps(bench.step, bench.views, bench.labels, bench.accelerator.device, args.steps)
    median = summarize(times)["median"]
    return {"step_time_median_s": median, "images_per_second": step["train"]["batch_size"] / median,
            "device": str(bench.accelerator.device)}


# ---------------------------------------------------------------- the report


def hours(entry: dict, rate: dict) -> Optional[float]:
    if "images_per_second" not in rate or not entry["images_per_epoch"]:
        return None
    return entry["images_per_epoch"] * entry["epochs"] / rate["images_per_second"] / 3600


def rows_of(entries: list[dict], rates: dict) -> list[dict]:
    rows = []
    for e in entries:
        rate = rates.get(e["key"], {"status": "not timed"})
        rows.append({"recipe": e["recipe"], "dataset": e["dataset"], "images_per_epoch": e["images_per_epoch"],
                     "epochs": e["epochs"], "recipe_batch": e["recipe_batch"], "measured_batch": None,
                     **rate, "device_hours": hours(e, rate)})
    return rows


def table(rows: list[dict], device: str) -> str:
    def rate(r):
        return r.get("error") or r.get("status") or f"{r['images_per_second']:.0f}"

    body = [[r["recipe"], r["dataset"], f"{r['images_per_epoch']:,}" if r["images_per_epoch"] else "unknown",
             r["epochs"], r["measured_batch"], rate(r),
             "–" if r["device_hours"] is None else f"{r['device_hours']:.1f}"] for r in rows]
    return (f"Pretraining device-hours per recipe on {device} (synthetic input: no loading, no linear "
            f"evaluation; `benchmarks/recipe_cost.py`):\n\n"
            + markdown_table(["recipe", "dataset", "images / epoch", "epochs", "timed batch", "images/s",
                              "device-hours"], body) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    from fasttrain.errors import RecipeError

    try:
        entries = plan(args)
    except RecipeError as exc:
        print(f"recipe_cost: {exc}", file=sys.stderr)
        return 2
    if not entries:
        print(f"recipe_cost: no recipe under {', '.join(map(str, args.recipes))}", file=sys.stderr)
        return 2
    steps = settings(entries)
    print(f"[recipe_cost] {len(entries)} recipes, {len(steps)} distinct steps to time", flush=True)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    rates: dict = {}
    for key, step in steps.items():
        if deadline and time.monotonic() > deadline:
            rates[key] = {"status": "not timed: out of time"}
            continue
        try:
            rates[key] = measure(step, args)
        except Exception as exc:  # one setting that fails leaves the others measured
            rates[key] = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"}
        print(f"[recipe_cost] {step['method']:<10} {step['model']['arch']:<9} {step['image_size']:>4}px "
              f"batch {rates[key].get('measured_batch', step['train']['batch_size']):>4}: "
              + (f"{rates[key]['images_per_second']:9.1f} img/s" if "images_per_second" in rates[key]
                 else rates[key]["error"]), flush=True)
        rows = rows_of(entries, rates)
        write_report(args.out, "recipe_cost", args, rows, table(rows, rates[key].get("device", "?")),
                     rows_key="recipes")
    rows = rows_of(entries, rates)
    text = table(rows, next((r["device"] for r in rows if "device" in r), "?"))
    write_report(args.out, "recipe_cost", args, rows, text, rows_key="recipes")
    print(text)
    print(f"[recipe_cost] wrote {shown(args.out)}/recipe_cost.{{json,md}}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
