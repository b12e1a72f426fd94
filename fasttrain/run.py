"""The main job: pretrain with a method, then linear evaluation, then results.json.

    accelerate launch fasttrain/run.py recipes/r50_selfcon.yaml [key=value ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fasttrain.recipe import Recipe, RecipeError, load_recipe  # noqa: E402
from loaders import LoaderError  # noqa: E402

log = logging.getLogger("fasttrain")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML file (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=256")
    parser.add_argument("--eval-only", metavar="CHECKPOINT", help="skip pretraining: linear-evaluate a checkpoint")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        results = run(recipe, args.eval_only)
    except (RecipeError, LoaderError) as exc:
        print(f"fasttrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasttrain: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    if results is not None:
        print(format_table(results))
    return 0


def run(recipe: Recipe, eval_only: str | None = None) -> dict | None:
    from fasttrain.engine import checkpoint
    from fasttrain.engine.linear_eval import classifier_eval, linear_eval
    from fasttrain.engine.trainer import (build_model, make_accelerator, train, write_results)
    from fasttrain.methods import get_method

    accelerator = make_accelerator(recipe)
    started = time.perf_counter()
    if eval_only:
        path = Path(eval_only)
        if not path.is_file():
            raise RecipeError(f"--eval-only: no such checkpoint: {path}")
        state = checkpoint.load(path)
        method = get_method(state["method"])
        model = build_model(Recipe.model_validate(state["recipe"]), method, num_classes=_num_classes(state))
        model.load_state_dict(state["model"])
        model.to(accelerator.device)
        trained = None
    else:
        trained = train(recipe, accelerator)
        model, method = trained.model, trained.method
    if method.contrastive and recipe.linear_eval.enabled:
        evaluation = linear_eval(recipe, accelerator, model)
    elif not method.contrastive:
        evaluation = classifier_eval(recipe, accelerator, model)
    else:
        evaluation = None
    results = {
        "method": method.name, "arch": recipe.model.arch, "loader": recipe.loader,
        "epochs": trained.epochs if trained else state["epoch"],
        "steps": trained.updates if trained else state["updates"],
        "global_batch_size": recipe.train.batch_size, "num_processes": accelerator.num_processes,
        "precision": recipe.train.precision, "device": accelerator.device.type,
        "images_per_second": trained.images_per_second if trained else None,
        "peak_memory_bytes": trained.peak_memory_bytes if trained else None,
        "peak_memory_kind": trained.peak_memory_kind if trained else None,
        "skipped_images": trained.skipped_images if trained else 0,
        "wall_seconds": time.perf_counter() - started,
        "linear_eval": evaluation,
    }
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    # an evaluation of an existing checkpoint must not overwrite the results of its pretraining
    write_results(Path(recipe.run.dir) / ("linear_eval.json" if eval_only else "results.json"), results)
    return results


def _num_classes(state: dict):
    weight = state["model"].get("classifier.weight")
    return None if weight is None else weight.shape[0]


def format_table(results: dict) -> str:
    lines = [f"{results['method']} / {results['arch']}: {results['epochs']} epochs, {results['steps']} steps"]
    if results["images_per_second"] is not None:
        lines[0] += (f", {results['images_per_second']:.1f} img/s, peak memory "
                     f"{results['peak_memory_bytes'] / 2**20:.0f} MiB ({results['peak_memory_kind']})")
    evaluation = results.get("linear_eval")
    if evaluation:
        lines += ["", "| classifier  | top-1 (%) | top-5 (%) |", "|-------------|-----------|-----------|"]
        for name in ("backbone", "subnetwork", "ensemble"):
            if evaluation.get(name):
                lines.append(f"| {name:<11} | {evaluation[name]['top1']:9.2f} | {evaluation[name]['top5']:9.2f} |")
        lines.append(f"\n{evaluation['samples']} validation images")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
