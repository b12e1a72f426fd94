"""Methods: a name maps to (views per image, exits used, loss). This module is also the batch
builder, the only place that knows single-view from two-view:

    single view -> one [B] forward;   two views -> both views concatenated into one [2B] forward.

Nothing else differs between methods, so a benchmark that swaps the method measures only what
the method really needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fasttrain.losses import cross_entropy, masked_mean, supcon_terms
from fasttrain.models import exit_names
from fasttrain.monitors import collapse_value, spread


@dataclass(frozen=True)
class Method:
    name: str
    num_views: int
    uses_subnetwork: bool
    contrastive: bool
    summary: str


METHODS = {m.name: m for m in (
    Method("ce", 1, False, False, "cross-entropy on the backbone classifier"),
    Method("supcon", 2, False, True, "SupCon: 2 augmented views, backbone exit"),
    Method("supcon_s", 1, False, True, "SupCon-S: 1 view, backbone exit"),
    Method("selfcon", 1, True, True, "SelfCon: 1 view, every exit"),
    Method("selfcon_m", 2, True, True, "SelfCon-M: 2 views, every exit"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: unknown, choose from {', '.join(METHODS)}")
    return METHODS[name]


def build_batch(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """One forward batch from the loader's views: [B] for one view, [V*B] (view-major) for more."""
    return views[0] if len(views) == 1 else torch.cat(tuple(views), dim=0)


def stack_exits(projections: Sequence[torch.Tensor], num_views: int) -> torch.Tensor:
    """Per-exit projections ``[V*B, D]`` -> ``[B, V*E, D]``; column ``v*E + e`` is view v, exit e."""
    per_exit = torch.stack([p.unflatten(0, (num_views, -1)) for p in projections], dim=2)  # [V, B, E, D]
    return per_exit.transpose(0, 1).flatten(1, 2)


@dataclass(frozen=True)
class Objective:
    """Given (model, views, labels), the loss of a method and what to log per exit."""

    method: Method
    temperature: float = 0.1
    base_temperature: float = 0.07
    label_smoothing: float = 0.0
    alpha: Optional[float] = None  # paper Eq. 7; needs a sub-network

    def __post_init__(self):
        if self.alpha is not None and not self.method.uses_subnetwork:
            raise ValueError(f"loss.alpha={self.alpha}: needs a method with a sub-network "
                             f"(selfcon, selfcon_m), not {self.method.name}")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"loss.alpha={self.alpha} must be >= 0")

    def __call__(self, model, views: Sequence[torch.Tensor], labels: torch.Tensor):
        """The loss and what to log: per-exit losses and ``spread/<exit>``, the collapse metric of
        what the loss reads (projections; for cross-entropy, the logits)."""
        if len(views) != self.method.num_views:
            raise ValueError(f"{self.method.name} needs {self.method.num_views} view(s), got {len(views)}")
        out = model(build_batch(views), project=self.method.contrastive)
        if not self.method.contrastive:
            loss = cross_entropy(out.logits, labels, self.label_smoothing)
            top1 = (out.logits.detach().argmax(1) == labels).float().mean()
            return loss, {"loss/ce": loss.detach(), "train_top1": top1, "spread/backbone": spread(out.logits)}
        loss, logs = self._contrastive(stack_exits(out.projections, len(views)), labels, len(out.projections))
        names = exit_names(len(out.projections))
        return loss, {**logs, **{f"spread/{n}": spread(z) for n, z in zip(names, out.projections)}}

    def loss_at_collapse(self, global_batch: int, num_exits: int) -> Optional[float]:
        """The loss when every feature is the same (None for cross-entropy)."""
        if not self.method.contrastive:
            return None
        views = self.method.num_views
        value = collapse_value(global_batch * views * num_exits, self.temperature, self.base_temperature)
        if self.alpha is None:
            return value
        backbone = collapse_value(global_batch * views, self.temperature, self.base_temperature)
        return (backbone + self.alpha * value) / (1 + self.alpha)

    def _contrastive(self, features: torch.Tensor, labels: torch.Tensor, num_exits: int):
        columns = range(features.shape[1])
        backbone = [c for c in columns if c % num_exits == num_exits - 1]
        subnet = [c for c in columns if c % num_exits != num_exits - 1]
        terms = dict(temperature=self.temperature, base_temperature=self.base_temperature)
        if self.alpha is None:
            per_anchor, valid = supcon_terms(features, labels, **terms)
            loss = masked_mean(per_anchor, valid)
            logs = {f"loss/{name}": masked_mean(per_anchor[:, e::num_exits].detach(), valid[:, e::num_exits])
                    for e, name in enumerate(exit_names(num_exits))}
        else:  # L = 1/(1+a) L_sup(backbone) + a/(1+a) L_self(all exits, sub-network anchors)
            sup, sup_valid = supcon_terms(features[:, backbone], labels, **terms)
            sub, sub_valid = supcon_terms(features, labels, anchor_views=subnet, **terms)
            sup, sub = masked_mean(sup, sup_valid), masked_mean(sub, sub_valid)
            loss = (sup + self.alpha * sub) / (1 + self.alpha)
            logs = {"loss/backbone": sup.detach(), "loss/subnetworks": sub.detach()}
        return loss, {"loss": loss.detach(), **logs}


__all__ = ["METHODS", "Method", "Objective", "build_batch", "get_method", "stack_exits"]
