"""Checkpoints written atomically: a temp name in the same directory, then os.replace."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


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
