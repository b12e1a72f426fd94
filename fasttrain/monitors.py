"""Is the run learning? Cheap signals read while it trains (docs/design.md, "Learning is measured").

* ``spread(z)``: the collapse metric of one exit, the standard deviation across the batch of the
  L2-normalised rows, averaged over dimensions, times sqrt(dim) (lightly's ``std_of_l2_normalized``,
  scaled): about 1 when the rows point every which way, 0 when they are all the same.
* ``collapse_value``: what ``supcon_loss`` equals when every feature is the same, log(N-1)*T/T_base.
* ``CollapseWatch``: one warning (or a stop) when a run sits collapsed for a set number of steps.

The epoch-end k-NN accuracy is in ``fasttrain.engine.knn``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("fasttrain")


class CollapseError(RuntimeError):
    """A run stopped because its representation collapsed (``monitor.on_collapse: stop``)."""


class NonFiniteLossError(RuntimeError):
    """A run stopped because its loss was NaN/Inf for ``train.max_nonfinite_steps`` steps in a row."""


@torch.no_grad()
def spread(z: torch.Tensor) -> torch.Tensor:
    """std over the batch of L2-normalised ``z [N, D]``, mean over D, times sqrt(D)."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


def collapse_value(num_features: int, temperature: float, base_temperature: float) -> float:
    """supcon_loss when all ``num_features`` features of the (global) batch are identical."""
    return math.log(max(2, num_features) - 1) * temperature / base_temperature


@dataclass
class CollapseWatch:
    """Watches the logged rows of a run; a row is collapsed when some exit's ``spread/<exit>`` is
    under ``threshold`` or the loss sits within ``tolerance`` (relative) of ``loss_at_collapse``.
    After ``patience`` steps of collapsed rows it warns once, or raises CollapseError."""

    threshold: float
    patience: int
    stop: bool = False
    loss_at_collapse: Optional[float] = None  # None: no such value (cross-entropy)
    tolerance: float = 5e-3
    since: Optional[int] = None
    warned: bool = False

    def __call__(self, row: dict, step: int) -> Optional[str]:
        low = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("spread/") and v < self.threshold}
        pinned = (self.loss_at_collapse is not None
                  and abs(row["loss"] - self.loss_at_collapse) <= self.tolerance * self.loss_at_collapse)
        if not (low or pinned):
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if step - self.since < self.patience or (self.warned and not self.stop):
            return None
        what = [f"exit {name} spread {value:.3f} < {self.threshold}" for name, value in sorted(low.items())]
        if pinned:
            what.append(f"loss {row['loss']:.4f} = log(N-1)*T/T_base = {self.loss_at_collapse:.4f}")
        message = (f"collapse at step {step} (since step {self.since}): {', '.join(what)}; every feature is "
                   f"the same. See docs/collapse.md")
        self.warned = True
        if self.stop:
            raise CollapseError(message)
        log.warning("%s; monitor.on_collapse=stop ends such runs", message)
        return message


__all__ = ["CollapseError", "CollapseWatch", "collapse_value", "spread"]
