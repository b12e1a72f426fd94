"""Checkpoints written atomically: a temp name in the same directory, then os.replace."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrain.engine.faults import replacing

log = logging.getLogger("fasttrain")
CHECKPOINT = "checkpoint.pt"
LINEAR_CLASSIFIERS = "linear_classifiers.pt"  # {exit name: {weight, bias}} of the linear evaluation


def atomic_save(obj: Any, path: Path) -> None:
    """Through a file object, so that a full disk is an OSError naming the file, not a C++ enforce."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def save_kept(state: dict, run_dir: Path, keep_last: int = 1) -> Path:
    """``checkpoint.pt``, and with ``keep_last > 1`` the same file linked as ``checkpoint-<updates>.pt``,
    of which the newest ``keep_last`` stay: earlier good ones for when the latest turns out broken."""
    latest = Path(run_dir) / CHECKPOINT
    atomic_save(state, latest)
    if keep_last > 1:
        numbered = latest.with_name(f"checkpoint-{state['updates']:08d}.pt")
        numbered.unlink(missing_ok=True)
        os.link(latest, numbered)
        for old in sorted(latest.parent.glob("checkpoint-*.pt"))[:-keep_last]:
            old.unlink(missing_ok=True)
    return latest


def load_newest_good(run_dir: Path, what: str):
    """(path, state) of ``checkpoint.pt`` or, if that is unreadable, of the newest readable kept one
    (with a warning naming both); (None, None) if there is none; a RecipeError if none is readable."""
    from fasttrain.recipe import RecipeError

    latest = Path(run_dir) / CHECKPOINT
    candidates = [latest, *sorted(latest.parent.glob("checkpoint-*.pt"), reverse=True)]
    first_error = None
    for path in (p for p in candidates if p.is_file()):
        try:
            state = load(path, what)
        except RecipeError as exc:
            first_error = first_error or exc
            continue
        if first_error:
            log.warning("%s; resuming from %s, the newest readable one", first_error, path)
        return path, state
    if first_error:
        raise first_error
    return None, None


def rng_state() -> dict:
    """Every random generator a training step draws from in this process (augmentations with
    ``num_workers: 0`` draw from torch's)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def num_classes(state: dict):
    """The classes of the classifier the checkpoint's model was trained with; None without one."""
    weight = state["model"].get("classifier.weight")
    return None if weight is None else weight.shape[0]


def load_weights(model: torch.nn.Module, state: dict, what: str) -> None:
    """The checkpoint's weights into ``model``; a model of another shape is one RecipeError line."""
    from fasttrain.recipe import RecipeError

    weights = state["model"]
    if not any(k.startswith("heads.") for k in model.state_dict()):  # older runs kept unused heads: not read
        weights = {k: v for k, v in weights.items() if not k.startswith("heads.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise RecipeError(f"{what} does not fit this model ({detail[1].strip() if len(detail) > 1 else detail[0]})") \
            from None
