"""What every analysis tool shares: a trained encoder from a checkpoint, a few evaluation batches,
the one-line error handling of ``run.py``; JSON and PNG files are written as the trainer writes its
results (``write_json``) and as the benchmarks write their figures (``save_png``): under a temp name,
renamed when complete."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

from fasttrain.files import save_figure as save_png  # noqa: F401  (re-exported for the tools)
from fasttrain.files import write_json  # noqa: F401  (for the tools)
from fasttrain.methods import Method, get_method
from fasttrain.models import MultiExitResNet
from fasttrain.errors import CheckpointError
from fasttrain.recipe import Recipe


class Trained(NamedTuple):
    recipe: Recipe  # the recipe the checkpoint was trained with
    method: Method
    model: MultiExitResNet  # in eval mode, on the CPU


def load_trained(path: Path, overrides: tuple[str, ...] = ()) -> Trained:
    """The encoder of a checkpoint (``checkpoint.pt`` of a run dir, or the run dir itself) with its
    recipe; ``overrides`` (``key=value``) change the recipe for the analysis, e.g. ``data.val=...``."""
    from fasttrain.engine import checkpoint
    from fasttrain.engine.trainer import build_model
    from fasttrain.recipe import apply_override

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    state = checkpoint.load(path, "checkpoint")
    recipe = checkpoint.recipe_of(state)
    if overrides:
        tree = recipe.model_dump()
        for assignment in overrides:
            apply_override(tree, assignment)
        recipe = Recipe.model_validate(tree)
    method = get_method(state["method"])
    model = build_model(recipe, method, num_classes=checkpoint.num_classes(state))
    checkpoint.load_weights(model, state, f"checkpoint {path}")
    return Trained(recipe, method, model.eval())


def eval_batches(recipe: Recipe, split: str, images: Optional[int] = None,
                 augment: str = "center") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images [B, 3, H, W], labels [B]) of ``split`` with the evaluation transform, on the
    CPU, at most ``images`` images (a seeded class-balanced subset when given)."""
    from accelerate import Accelerator

    from fasttrain.engine.linear_eval import eval_loader

    accelerator = Accelerator(cpu=True)
    loader = eval_loader(recipe, accelerator, split, augment, subset=images)
    for views, labels in loader:
        yield views[0].contiguous(), labels


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
