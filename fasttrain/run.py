"""The main job: pretrain with a method, then linear evaluation, then results.json.

    accelerate launch fasttrain/run.py recipes/r50_selfcon.yaml [key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fasttrain.recipe import Recipe

log = logging.getLogger("fasttrain")
EXIT_CODES = """exit status: 0 done; 1 the system refused a file operation (disk full, no permission), or a loader
worker or another process of the run died; 2 bad input
(recipe key, path, file, checkpoint); 3 stopped itself: collapse (monitor.on_collapse: stop) or a loss
not finite for train.max_nonfinite_steps steps in a row;
130 interrupted (Ctrl-C); 143 / 138 stopped by SIGTERM / SIGUSR1 (preemption: during training, a checkpoint of the
exact step is written first; requeue and resume with run.resume=auto). Every non-zero exit leaves the last checkpoint
intact."""


def main(argv=None) -> int:
    from fasttrain.faults import one_line_errors, stop_on_signals  # the standard library only

    def body() -> int:  # a stop is one line from the first import on
        stop_on_signals()
        return _main(argv)

    return one_line_errors("fasttrain", body, kept="; the last checkpoint is intact", crashes=True)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML file (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=256")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--eval-only", metavar="CHECKPOINT", help="skip pretraining: evaluate a checkpoint")
    start.add_argument("--random-init", action="store_true",
                       help="skip pretraining: evaluate the recipe's encoder at its (seeded) random initialisation, "
                            "the floor every method must beat; writes random_init.json")
    knn = parser.add_argument_group("k-NN evaluation (with --eval-only or --random-init, instead of the linear one)")
    knn.add_argument("--knn", action="store_true",
                     help="weighted k-NN of every exit and their ensemble, the whole train split as the bank")
    knn.add_argument("--knn-k", type=int, default=20, metavar="K", help="neighbours (default 20)")
    knn.add_argument("--knn-temperature", type=float, default=0.07, metavar="T", help="vote weight exp(sim/T)")
    knn.add_argument("--knn-bank", type=int, metavar="N",
                     help="use a seeded subset of N train images as the bank (default: all; the bank holds "
                          "N x feature dim floats per exit on the device)")
    args = parser.parse_intermixed_args(argv)
    if args.knn and not (args.eval_only or args.random_init):
        parser.error("--knn evaluates an existing encoder: add --eval-only CHECKPOINT or --random-init")
    for flag, value in (("--knn-k", args.knn_k), ("--knn-temperature", args.knn_temperature),
                        ("--knn-bank", args.knn_bank or 1)):
        if value <= 0:
            parser.error(f"{flag}={value}: must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for ours in ("fasttrain", "loaders"):  # our INFO lines; the libraries' only from WARNING up
        logging.getLogger(ours).setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    from fasttrain.monitors import CollapseError, NonFiniteLossError
    from fasttrain.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        knn_options = dict(k=args.knn_k, temperature=args.knn_temperature, bank=args.knn_bank) if args.knn else None
        results = run(recipe, args.eval_only, random_init=args.random_init, knn=knn_options)
    except (CollapseError, NonFiniteLossError) as exc:
        print(f"fasttrain: stopped: {exc}; the last checkpoint is intact", file=sys.stderr)
        return 3
    if results is not None:
        print(format_table(results))
    return 0


def run(recipe: Recipe, eval_only: str | None = None, random_init: bool = False,
        knn: dict | None = None) -> dict | None:
    """Pretrain and evaluate; or evaluate a checkpoint (``eval_only``), or the untrained encoder
    (``random_init``). What is evaluated is described by what was trained: the checkpoint's recipe.
    ``knn`` (``{k, temperature, bank}``): with either, a k-NN evaluation on whole splits instead of
    the linear one; its numbers join those of the linear one in the same JSON file. One run per
    ``run.dir`` at a time: a second is refused in one line while the first holds it."""
    from fasttrain.faults import stop_on_signals

    stop_on_signals(recipe.run.stop_signals)
    with holding_run_dir(Path(recipe.run.dir)):
        return _run(recipe, eval_only, random_init, knn)


class _Encoder(NamedTuple):
    """What is evaluated: the model, its method and the recipe it was trained with, the training's
    result (None when not trained here) and the checkpoint's position (``epoch``, ``updates``)."""
    model: object
    method: object
    recipe: object
    trained: object = None
    state: dict = {"epoch": 0, "updates": 0}


def _run(recipe: Recipe, eval_only: str | None, random_init: bool, knn: dict | None) -> dict | None:
    from fasttrain.engine.trainer import make_accelerator
    from fasttrain.files import write_json

    accelerator = make_accelerator(recipe)
    started = time.perf_counter()
    if eval_only:
        encoder = _from_checkpoint(Path(eval_only))
    elif random_init:
        encoder = _at_random_init(recipe)
    else:
        encoder = _pretrained(recipe, accelerator)
    encoder.model.to(accelerator.device)
    results = _evaluated(recipe, accelerator, encoder, knn, random_init)
    results.update(wall_seconds=time.perf_counter() - started,
                   checkpoint=str(Path(eval_only).resolve()) if eval_only else None)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    # an evaluation of an existing checkpoint must not overwrite the results of its pretraining
    name = "linear_eval.json" if eval_only else "random_init.json" if random_init else "results.json"
    if encoder.trained is None:
        results = _joined(Path(recipe.run.dir) / name, results)
    write_json(Path(recipe.run.dir) / name, results)
    return results


def _pretrained(recipe: Recipe, accelerator) -> _Encoder:
    from fasttrain.engine.trainer import train

    trained = train(recipe, accelerator)
    return _Encoder(trained.model, trained.method, recipe, trained)


def _from_checkpoint(path: Path) -> _Encoder:
    """``--eval-only``: the checkpoint's encoder, described by the recipe it was trained with."""
    from fasttrain.engine import checkpoint
    from fasttrain.engine.trainer import build_model
    from fasttrain.errors import CheckpointError
    from fasttrain.methods import get_method

    if not path.is_file():
        raise CheckpointError(f"--eval-only: no such checkpoint: {path}")
    state = checkpoint.load(path, "--eval-only")
    trained_recipe, method = checkpoint.recipe_of(state), get_method(state["method"])
    model = build_model(trained_recipe, method, num_classes=checkpoint.num_classes(state))
    checkpoint.load_weights(model, state, f"--eval-only: {path}")
    return _Encoder(model, method, trained_recipe, None, state)


def _at_random_init(recipe: Recipe) -> _Encoder:
    """``--random-init``: the recipe's encoder untrained (seeded), without classifiers: the floor."""
    from accelerate.utils import set_seed

    from fasttrain.engine.trainer import build_model
    from fasttrain.methods import get_method

    set_seed(recipe.train.seed)
    method = get_method(recipe.method)
    return _Encoder(build_model(recipe, method, num_classes=None), method, recipe)  # a random classifier is no floor


def _evaluated(recipe: Recipe, accelerator, encoder: _Encoder, knn: dict | None, random_init: bool) -> dict:
    """The results of ``encoder``: its evaluation (k-NN with ``knn``; else linear or its own classifiers)
    and what its training measured."""
    from fasttrain.engine.knn import KNNMonitor
    from fasttrain.engine.linear_eval import classifier_eval, linear_eval

    model, method, trained, state = encoder.model, encoder.method, encoder.trained, encoder.state
    knn_curve, knn_eval, evaluation = trained.knn if trained else [], None, None
    if knn is not None:
        knn_eval = KNNMonitor(recipe, accelerator, knn["bank"], None, knn["k"], knn["temperature"]).evaluate(model)
    elif method.evaluation == "linear" or random_init:
        evaluation = linear_eval(recipe, accelerator, model) if recipe.linear_eval.enabled else None
    else:
        evaluation = classifier_eval(recipe, accelerator, model)
    if trained is None and knn is None and recipe.monitor.knn_every:
        knn_curve = [{"epoch": state["epoch"], **KNNMonitor.online(recipe, accelerator)(model)}]
    measured = {key: getattr(trained, key, None) for key in (
        "images_per_second", "peak_memory_bytes", "peak_memory_kind", "device_memory_bytes")}
    return {
        "method": method.name, "arch": encoder.recipe.model.arch, "loader": recipe.loader, "random_init": random_init,
        "epochs": trained.epochs if trained else state["epoch"],
        "steps": trained.updates if trained else state["updates"],
        "global_batch_size": recipe.train.batch_size, "num_processes": accelerator.num_processes,
        "precision": recipe.train.precision, "device": accelerator.device.type, **measured,
        "skipped_images": trained.skipped_images if trained else 0,
        "nonfinite_steps": trained.nonfinite_steps if trained else 0,
        "classes": trained.classes if trained else state.get("classes"),
        "linear_eval": evaluation, "knn": knn_curve, "knn_eval": knn_eval,
    }


def _joined(path: Path, results: dict) -> dict:
    """An evaluation of the same encoder (checkpoint and steps) as the one already in ``path`` keeps
    the other kind of evaluation found there: ``--knn`` then a linear evaluation give one file."""
    import json

    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    same = all(before.get(key) == results[key] for key in ("checkpoint", "steps", "method", "arch", "random_init"))
    if not same:
        return results
    kept = {key: before.get(key) for key in ("linear_eval", "knn_eval", "knn") if not results[key]}
    return {**results, **{key: value for key, value in kept.items() if value}}


@contextlib.contextmanager
def holding_run_dir(run_dir: Path):
    """``prepare_run_dir``, and for the launch's first process an exclusive lock on ``run.dir/.lock``
    (holding its pid) until the block ends: two runs on one directory would interleave their metrics
    and checkpoints. The lock dies with its process, so a killed run never leaves it behind."""
    import fcntl

    from fasttrain.errors import RecipeError

    prepare_run_dir(run_dir, sweep=False)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with open(run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise RecipeError(f"run.dir={run_dir}: another run (process {holder}) is using it; wait for it to "
                              f"end or give this run another run.dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        from fasttrain.files import sweep_stale_temps
        sweep_stale_temps(run_dir)  # only now: another live run's temp files are not ours to remove
        yield


def prepare_run_dir(run_dir: Path, sweep: bool = True) -> None:
    """The run dir exists and can be written, before any work; temp files that killed runs left there
    are removed (``sweep``)."""
    from fasttrain.files import sweep_stale_temps
    from fasttrain.recipe import RecipeError

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RecipeError(f"run.dir={run_dir}: exists and is not a directory") from None
    except NotADirectoryError:
        raise RecipeError(f"run.dir={run_dir}: a part of this path is a file, not a directory") from None
    except PermissionError as exc:
        raise RecipeError(f"run.dir={run_dir}: no permission to create {exc.filename}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RecipeError(f"run.dir={run_dir}: not writable")
    if sweep:
        sweep_stale_temps(run_dir)


def format_table(results: dict) -> str:
    what = ("random initialisation" if results.get("random_init")
            else f"{results['epochs']} epochs, {results['steps']} steps")
    lines = [f"{results['method']} / {results['arch']}: {what}"]
    if results["images_per_second"] is not None:
        lines[0] += (f", {results['images_per_second']:.1f} img/s, peak memory "
                     f"{results['peak_memory_bytes'] / 2**20:.0f} MiB ({results['peak_memory_kind']})")
    evaluation = results.get("linear_eval")
    if evaluation:
        lines += ["", "| classifier  | top-1 (%) | top-5 (%) |", "|-------------|-----------|-----------|"]
        exits = evaluation.get("exits") or {n: evaluation[n] for n in ("backbone", "subnetwork", "ensemble")
                                            if evaluation.get(n)}
        for name, acc in exits.items():
            lines.append(f"| {name:<11} | {acc['top1']:9.2f} | {acc['top5']:9.2f} |" if acc["top1"] is not None else
                         f"| {name:<11} | not finite: {acc['nonfinite_samples']} images' logits are NaN/Inf |")
        lines.append(f"\n{evaluation['samples']} validation images")
    knn_eval = results.get("knn_eval")
    if knn_eval:
        lines += ["", f"k-NN (k={knn_eval['k']}, T={knn_eval['temperature']}, bank of {knn_eval['bank_images']} "
                      f"train images, {knn_eval['samples']} validation images)",
                  "| exit        | top-1 (%) | top-5 (%) |", "|-------------|-----------|-----------|"]
        lines += [f"| {name:<11} | {knn_eval[name]['top1']:9.2f} | {knn_eval[name]['top5']:9.2f} |"
                  for name in knn_eval["exits"]]
    if results.get("knn"):
        last = results["knn"][-1]
        lines.append("k-NN top-1 (%): " + ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k != "epoch"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
