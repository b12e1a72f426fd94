"""A sweep of one recipe key: the main job once per value, each in its own run dir, then one table
and one plot of accuracy per exit (and mutual information with ``--mi``) against the value.

    python -m fasttrain.analysis.sweep recipes/demo_selfcon.yaml --set loss.alpha=0,0.1,0.2,0.5,1
    python -m fasttrain.analysis.sweep recipes/demo_selfcon.yaml --set train.batch_size=32,64,128 --mi

Paper Fig. 6 (accuracy and I(F;T) as alpha of Eq. 7 grows) and Table 5 (accuracy across batch
sizes) in one command. Each value runs ``fasttrain/run.py`` itself (``--launcher`` puts e.g.
``accelerate launch --num_processes 2`` in front): the sweep never trains by its own code. Run dirs
are ``<out>/<key>=<value>``; a value whose run dir already has ``results.json`` is not run again,
and an interrupted one resumes from its checkpoint (``run.resume: auto``), so the same command
continues a sweep. Every value's recipe is validated before the first run starts.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path


from fasttrain.analysis.common import pyplot, save_png, write_json
from fasttrain.faults import one_line_errors
from fasttrain.files import write_bytes
from fasttrain.recipe import RecipeError

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"


def parse_values(assignment: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` -> (key, [v1, v2, ...]); commas inside brackets belong to a list value."""
    key, sep, text = assignment.partition("=")
    values = [v.strip() for v in re.split(r",(?![^\[]*\])", text)] if sep else []
    if not key or not values or any(not v for v in values):
        raise RecipeError(f"--set {assignment!r}: expected key=value1,value2,...")
    if len(set(values)) != len(values):
        raise RecipeError(f"--set {assignment!r}: a value is listed twice")
    return key, values


def run_dir_name(key: str, value: str) -> str:
    return f"{key}={re.sub(r'[^A-Za-z0-9._=,+-]', '', value)}"


def accuracy(results: dict) -> dict:
    """Top-1 per exit of a finished run: its linear (or classifier) evaluation, else its last k-NN."""
    evaluation = results.get("linear_eval") or {}
    if evaluation.get("exits"):
        return {name: e["top1"] for name, e in evaluation["exits"].items()}
    knn = (results.get("knn") or [{}])[-1]
    return {name: v for name, v in knn.items() if name != "epoch"}


def mutual_information(run_dir: Path, python: str, images: int) -> dict:
    """The run's I(F;T) per estimator (nats), by ``fasttrain.analysis.mutual_info`` on its checkpoint."""
    out = run_dir / "analysis"
    if not (out / "mutual_info.json").is_file():
        command = [python, "-m", "fasttrain.analysis.mutual_info", str(run_dir / "checkpoint.pt"), "--out", str(out),
                   "--images", str(images)]
        if subprocess.run(command).returncode != 0:
            raise RecipeError(f"mutual information of {run_dir} failed (command: {shlex.join(command)})")
    found = json.loads((out / "mutual_info.json").read_text())
    return {row["estimator"]: row["estimate"] for row in found["results"]}


def table(key: str, rows: list[dict]) -> str:
    exits = list(dict.fromkeys(name for row in rows for name in row["top1"]))
    estimators = list(dict.fromkeys(name for row in rows for name in row.get("mutual_info", {})))
    header = [key, *(f"top-1 {e}" for e in exits), *(f"I(F;T) {m}" for m in estimators)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["value"], *(f"{row['top1'].get(e, math.nan):.2f}" for e in exits),
                 *(f"{row.get('mutual_info', {}).get(m, math.nan):.3f}" for m in estimators)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(key: str, rows: list[dict], path: Path) -> None:
    plt = pyplot()

    with_mi = any(row.get("mutual_info") for row in rows)
    fig, axes = plt.subplots(1, 2 if with_mi else 1, figsize=(11 if with_mi else 6, 4), constrained_layout=True,
                             squeeze=False)
    positions = range(len(rows))  # evenly spaced: values may be categorical or span decades
    panels = [("top1", "top-1 (%)", "accuracy per exit")] + [("mutual_info", "nats", "I(F(x); T(x))")] * with_mi
    for ax, (field, unit, title) in zip(axes[0], panels):
        for name in dict.fromkeys(n for row in rows for n in row.get(field, {})):
            ax.plot(positions, [row.get(field, {}).get(name, math.nan) for row in rows], marker="o", label=name)
        ax.set_xticks(list(positions), [row["value"] for row in rows])
        ax.set_xlabel(key)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
    save_png(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides shared by every run")
    parser.add_argument("--set", required=True, metavar="KEY=V1,V2,...", help="the swept key and its values")
    parser.add_argument("--out", help="sweep folder (default: <run.dir>-sweep-<key>)")
    parser.add_argument("--mi", action="store_true", help="also estimate I(F;T) of each run's checkpoint")
    parser.add_argument("--mi-images", type=int, default=3000, help="validation images for --mi (default 3000)")
    parser.add_argument("--launcher", default="", help="command in front of run.py, e.g. 'accelerate launch'")
    args = parser.parse_intermixed_args(argv)
    return one_line_errors("sweep", lambda: _main(args))


def _main(args) -> int:
    from fasttrain.recipe import load_recipe

    key, values = parse_values(args.set)
    if any(o.partition("=")[0] in (key, "run.dir") for o in args.overrides):
        raise RecipeError(f"{key} and run.dir are set by the sweep: remove them from the overrides")
    base = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path(f"{base.run.dir}-sweep-{key}")
    runs = {value: out / run_dir_name(key, value) for value in values}
    for value, run_dir in runs.items():  # every value's recipe, before the first run starts
        load_recipe(args.recipe, [*args.overrides, f"{key}={value}", f"run.dir={run_dir}"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (value, run_dir) in enumerate(runs.items()):
        if (run_dir / "results.json").is_file():
            print(f"sweep: {key}={value} [{i + 1}/{len(values)}]: done before, kept ({run_dir})", flush=True)
        else:
            print(f"sweep: {key}={value} [{i + 1}/{len(values)}] -> {run_dir}", flush=True)
            command = [*shlex.split(args.launcher or sys.executable), str(RUN_PY), args.recipe, *args.overrides,
                       f"{key}={value}", f"run.dir={run_dir}", "run.resume=auto"]
            code = subprocess.run(command).returncode
            if code != 0:
                raise RecipeError(f"{key}={value}: run.py exited with {code} (the runs before it are kept; "
                                  f"the same command resumes)")
        results = json.loads((run_dir / "results.json").read_text())
        row = {"value": value, "run_dir": str(run_dir), "top1": accuracy(results), "steps": results.get("steps")}
        if args.mi:
            row["mutual_info"] = mutual_information(run_dir, sys.executable, args.mi_images)
        rows.append(row)
    write_json(out / "sweep.json", {"recipe": args.recipe, "overrides": args.overrides, "key": key, "runs": rows})
    text = table(key, rows)
    write_bytes(out / "sweep.md", (text + "\n").encode())
    plot(key, rows, out / "sweep.png")
    print(text)
    print(f"wrote {out / 'sweep.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
