"""Checkpoints written atomically: a temp name in the same directory, then os.replace."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrain.files import replacing
from fasttrain.errors import CheckpointError
from fasttrain.faults import one_line_errors
from fasttrain.recipe import Recipe

log = logging.getLogger("fasttrain")
CHECKPOINT = "checkpoint.pt"
LINEAR_CLASSIFIERS = "linear_classifiers.pt"  # {exit name: {weight, bias}} of the linear evaluation


def atomic_save(obj: Any, path: Path) -> None:
    """Through a file object, so that a full disk is an OSError naming the file, not a C++ enforce."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as file:
        try:
            torch.save(obj, file)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (a full disk) as its own error
            raise OSError(errno.EIO, f"cannot write {path} ({_first_line(exc)}); is the disk full?", str(path)) \
                from None


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
    (with a warning naming both); (None, None) if there is none; a CheckpointError if none is readable."""
    latest = Path(run_dir) / CHECKPOINT
    candidates = [latest, *sorted(latest.parent.glob("checkpoint-*.pt"), reverse=True)]
    first_error = None
    for path in (p for p in candidates if p.is_file()):
        try:
            state = load(path, what)
        except CheckpointError as exc:
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
    ``num_workers: 0`` draw from torch's), as tensors and plain values only (a weights-only load)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate wants tuples where a round trip may have left lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


REQUIRED = ("model", "recipe", "method", "arch", "epoch", "updates")


UPGRADE = "python -m fasttrain.engine.checkpoint --upgrade-trusted OLD.pt NEW.pt"


def read_tensors(path: Path, what: str, kind: str = "checkpoint"):
    """``torch.load`` restricted to tensors and plain data (``weights_only``): a file that holds other
    Python objects is refused, never unpickled (unpickling can run code). Any failure is one
    CheckpointError line naming ``what`` (the key or flag that gave the path) and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc):
            raise CheckpointError(f"{what}: {path} is not a readable {kind} ({_first_line(exc)})") from None
        raise CheckpointError(
            f"{what}: {path} holds Python objects besides tensors and plain data, so it is not loaded (unpickling "
            f"it could run code); a checkpoint of an earlier fasttrain that you trust converts with: {UPGRADE}") \
            from None
    except Exception as exc:  # torch.load raises a different type for each way a file can be broken
        raise CheckpointError(f"{what}: {path} is not a readable {kind} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load(path: Path, what: str) -> dict:
    """A checkpoint written by this project; anything else (truncated, empty, another file, one that
    holds code) is one CheckpointError line naming ``what`` and the file."""
    state = read_tensors(path, what)
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{what}: {path} is not a fasttrain checkpoint (no {', '.join(missing)})")
    return state


def recipe_of(state: dict):
    """The recipe a checkpoint was trained with. Checkpoints older than ``model.head`` hold the plain
    head (``mlp``), which is no longer the default."""

    tree = dict(state["recipe"])
    tree["model"] = {"head": "mlp", **tree.get("model", {})}
    return Recipe.model_validate(tree)


def num_classes(state: dict):
    """The classes of the classifier the checkpoint's model was trained with; None without one."""
    weight = state["model"].get("classifier.weight")
    return None if weight is None else weight.shape[0]


def load_weights(model: torch.nn.Module, state: dict, what: str) -> None:
    """The checkpoint's weights into ``model``; a model of another shape is one CheckpointError line."""
    weights = state["model"]
    if not any(k.startswith("heads.") for k in model.state_dict()):  # older runs kept unused heads: not read
        weights = {k: v for k, v in weights.items() if not k.startswith("heads.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise CheckpointError(f"{what} does not fit this model "
                              f"({detail[1].strip() if len(detail) > 1 else detail[0]})") \
            from None


def upgrade_trusted(old: Path, new: Path) -> None:
    """Rewrites a checkpoint of an earlier fasttrain (its numpy RNG states pickled as arrays) as tensors
    and plain data, which ``load`` reads. This unpickles ``old``: only for a file you trust."""
    state = torch.load(old, map_location="cpu", weights_only=False)  # the user vouches for this file
    for rng in state.get("rng") or []:
        if isinstance(rng.get("numpy"), tuple):
            kind, keys, position, has_gauss, gauss = rng["numpy"]
            rng["numpy"] = {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                            "position": int(position), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    atomic_save(state, new)
    load(new, "NEW")  # what was written reads back without unpickling code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttrain.engine.checkpoint",
                                     description="Convert a checkpoint of an earlier fasttrain that you trust.")
    parser.add_argument("--upgrade-trusted", nargs=2, metavar=("OLD", "NEW"), type=Path, required=True,
                        help="unpickle OLD (it can run code: only a file you trust) and write it as NEW")
    old, new = parser.parse_args(argv).upgrade_trusted
    return one_line_errors("fasttrain.engine.checkpoint", lambda: _upgrade(old, new))


def _upgrade(old: Path, new: Path) -> int:
    try:
        upgrade_trusted(old, new)
    except (CheckpointError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # not a checkpoint
        raise CheckpointError(f"{old}: {_first_line(exc)}") from None
    print(f"wrote {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
