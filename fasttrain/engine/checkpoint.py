"""Checkpoints written atomically: a temp name in the same directory, then os.replace."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fasttrain.engine.faults import replacing

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """Through a file object, so that a full disk is an OSError naming the file, not a C++ enforce."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


REQUIRED = ("model", "recipe", "method", "arch", "epoch", "updates")


def load(path: Path, what: str) -> dict:
    """A checkpoint written by this project; anything else (truncated, empty, another file) is one
    RecipeError line naming ``what`` (the key or flag that gave the path) and the file."""
    from fasttrain.recipe import RecipeError

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises a different type for each way a file can be broken
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"{what}: {path} is not a readable checkpoint ({reason})") from None
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    if missing:
        raise RecipeError(f"{what}: {path} is not a fasttrain checkpoint (no {', '.join(missing)})")
    return state


def recipe_of(state: dict):
    """The recipe a checkpoint was trained with. Checkpoints older than ``model.head`` hold the plain
    head (``mlp``), which is no longer the default."""
    from fasttrain.recipe import Recipe

    tree = dict(state["recipe"])
    tree["model"] = {"head": "mlp", **tree.get("model", {})}
    return Recipe.model_validate(tree)


def load_weights(model: torch.nn.Module, state: dict, what: str) -> None:
    """The checkpoint's weights into ``model``; a model of another shape is one RecipeError line."""
    from fasttrain.recipe import RecipeError

    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise RecipeError(f"{what} does not fit this model ({detail[1].strip() if len(detail) > 1 else detail[0]})") \
            from None
