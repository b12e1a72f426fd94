"""The supervised contrastive loss family (SelfCon paper Eq. 1, 2, 7) and cross-entropy.

One function serves SupCon, SupCon-S, SelfCon and SelfCon-M: what differs is only which features
(views and/or exits) are stacked into ``features [B, V, D]`` and which of them are anchors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

_MASKED = -1e9  # stands in for -inf on the diagonal: exp() is 0, and nothing downstream turns NaN


def _gather(features: torch.Tensor, labels: Optional[torch.Tensor]):
    """Features and labels of every process, features with gradient (all_gather's backward sums
    the gradients of all processes, so DDP's gradient mean gives the global-batch gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    features = torch.cat(all_gather_with_grad(features.contiguous()), dim=0)
    if labels is not None:
        gathered = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(gathered, labels.contiguous())
        labels = torch.cat(gathered)
    return features, labels, rank


def supcon_terms(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, temperature: float = 0.1,
                 base_temperature: float = 0.07, anchor_views: Optional[Sequence[int]] = None):
    """Per-anchor losses ``[B_global, A]`` and the mask of anchors that have a positive.

    ``A = len(anchor_views)``. Exposed so that methods can log a loss per exit at no extra cost.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, V, D], got shape {tuple(features.shape)}")
    batch, views, _ = features.shape
    if labels is not None and labels.shape != (batch,):
        raise ValueError(f"labels must be [B]={batch}, got shape {tuple(labels.shape)}")
    anchor_views = list(range(views)) if anchor_views is None else list(anchor_views)
    if not anchor_views or any(not 0 <= v < views for v in anchor_views):
        raise ValueError(f"anchor_views={anchor_views} must be a non-empty subset of 0..{views - 1}")
    if temperature <= 0 or base_temperature <= 0:
        raise ValueError(f"temperature={temperature}, base_temperature={base_temperature} must be positive")

    with torch.autocast(features.device.type, enabled=False):
        feats, labels, _ = _gather(features.float(), labels)
        batch = feats.shape[0]
        if labels is None:  # self-supervised: positives are the other features of the same row
            labels = torch.arange(batch, device=feats.device)
        labels = labels.to(feats.device)
        contrast = feats.reshape(batch * views, -1)  # row b*V + v
        anchors = feats[:, anchor_views].reshape(batch * len(anchor_views), -1)
        logits = anchors @ contrast.T / temperature  # [B*A, B*V]

        anchor_rows = torch.arange(batch, device=feats.device).repeat_interleave(len(anchor_views))
        anchor_cols = torch.tensor(anchor_views, device=feats.device).repeat(batch)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(logits.shape[0], device=feats.device), anchor_rows * views + anchor_cols] = True

        logits = logits - logits.detach().max(dim=1, keepdim=True).values
        log_norm = torch.logsumexp(logits.masked_fill(is_self, _MASKED), dim=1, keepdim=True)
        log_prob = logits - log_norm
        positive = (labels[anchor_rows, None] == labels.repeat_interleave(views)[None, :]) & ~is_self
        num_pos = positive.sum(dim=1)
        mean_log_prob = torch.where(positive, log_prob, 0.0).sum(dim=1) / num_pos.clamp(min=1)
        loss = -(temperature / base_temperature) * mean_log_prob
    return loss.view(batch, len(anchor_views)), (num_pos > 0).view(batch, len(anchor_views))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked entries; 0 (with a gradient path) when none is left."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def supcon_loss(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, temperature: float = 0.1,
                base_temperature: float = 0.07, anchor_views: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Supervised contrastive loss over ``features [B, V, D]`` (L2-normalised), as DESIGN.md states.

    Every feature in an ``anchor_views`` column is an anchor; its contrast set is every other
    feature of the (globally gathered) batch; its positives are those with the same label (or the
    same row when ``labels`` is None). Anchors without a positive are left out.
    """
    loss, valid = supcon_terms(features, labels, temperature=temperature, base_temperature=base_temperature,
                               anchor_views=anchor_views)
    return masked_mean(loss, valid)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


__all__ = ["cross_entropy", "masked_mean", "supcon_loss", "supcon_terms"]
