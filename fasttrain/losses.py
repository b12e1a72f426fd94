"""The supervised contrastive loss family (SelfCon paper Eq. 1, 2, 7; without labels, SimCLR's
NT-Xent), MixCo's soft InfoNCE of mix-ups, and cross-entropy.

One function serves SupCon, SupCon-S, SelfCon and SelfCon-M: what differs is only which features
(views and/or exits) are stacked into ``features [B, V, D]`` and which of them are anchors.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from fasttrain.tracing import mark

_MASKED = -1e9  # stands in for -inf on the diagonal: exp() is 0, and nothing downstream turns NaN


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(features: torch.Tensor, labels: Optional[torch.Tensor], gather: bool = True):
    """The contrast set: features of every process (with gradient: all_gather's backward sums the
    gradients of all processes into each one's own rows), their labels, and where this process's
    rows start in it. Every process holds the same number of rows. ``gather`` False: this process's
    own rows only (each process contrasts within its batch)."""
    world, rank = _world()
    if world == 1 or not gather:
        return features, labels, 0
    with mark("gather"):
        # torch.distributed.nn's all_gather: public since torch 1.8, backward reduce-scatters (sums)
        gathered = torch.cat(all_gather_with_grad(features.contiguous()))
        if labels is not None:
            parts = [torch.empty_like(labels) for _ in range(world)]
            dist.all_gather(parts, labels.contiguous())
            labels = torch.cat(parts)
    return gathered, labels, rank * features.shape[0]


class _ContrastLogSumExp(torch.autograd.Function):
    """``logsumexp_k (anchor . contrast_k) / T`` over each anchor's row, its own column left out.

    Written by hand because autograd's version keeps the ``[rows, columns]`` logits for backward and
    makes three more of that size there; this keeps only the inputs and the result, and backward
    recomputes the logits once and turns them into the softmax in place: one logits-sized buffer at
    a time, forward and backward, for one more matrix product.
    """

    @staticmethod
    def forward(ctx, anchors, contrast, own_column, temperature):
        logits = _masked_logits(anchors, contrast, own_column, temperature)
        top = logits.max(dim=1).values
        total = logits.sub_(top[:, None]).exp_().sum(dim=1)
        result = top + total.log()
        ctx.save_for_backward(anchors, contrast, own_column, result)
        ctx.temperature = temperature
        return result

    @staticmethod
    def backward(ctx, grad):
        anchors, contrast, own_column, result = ctx.saved_tensors
        softmax = _masked_logits(anchors, contrast, own_column, ctx.temperature).sub_(result[:, None]).exp_()
        softmax.mul_(grad[:, None] / ctx.temperature)  # d/d(anchor . contrast) of the row's logsumexp
        grad_anchors = softmax @ contrast if ctx.needs_input_grad[0] else None
        grad_contrast = softmax.T @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_contrast, None, None


@functools.lru_cache(maxsize=64)
def _index(values: tuple, device: torch.device) -> torch.Tensor:
    """An index tensor built once per device, not every step (on a GPU a tensor made from Python
    values is a synchronising copy from pageable memory)."""
    return torch.tensor(values, device=device)


def _group_index(labels: torch.Tensor) -> torch.Tensor:
    """For each row, the index of its label among the distinct labels (``torch.unique``'s inverse),
    computed with shapes fixed by the input alone: ``torch.unique`` and ``bincount`` size their
    outputs by the data, which makes the host wait for the device every step."""
    ordered, order = labels.sort(stable=True)
    starts = torch.ones_like(ordered, dtype=torch.long)
    starts[1:] = (ordered[1:] != ordered[:-1]).long()
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


def _masked_logits(anchors, contrast, own_column, temperature):
    logits = (anchors @ contrast.T).div_(temperature)
    logits[torch.arange(logits.shape[0], device=logits.device), own_column] = _MASKED
    return logits


def supcon_terms(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, temperature: float = 0.1,
                 base_temperature: float = 0.07, anchor_views: Optional[Sequence[int]] = None, gather: bool = True):
    """Per-anchor losses ``[B, A]`` of this process's anchors and the mask of those that have a positive.

    ``A = len(anchor_views)``. Anchors are this process's own features; their contrast set is the
    batch of every process. Cost: one ``[B*A, B_global*V]`` logits matrix per process at a time
    (``_ContrastLogSumExp``): no boolean masks, the positives' logits are summed from per-label sums
    of the contrast features, and the anchor itself is masked by index.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, V, D], got shape {tuple(features.shape)}")
    batch, views, dim = features.shape
    if labels is not None and labels.shape != (batch,):
        raise ValueError(f"labels must be [B]={batch}, got shape {tuple(labels.shape)}")
    anchor_views = list(range(views)) if anchor_views is None else list(anchor_views)
    if not anchor_views or any(not 0 <= v < views for v in anchor_views):
        raise ValueError(f"anchor_views={anchor_views} must be a non-empty subset of 0..{views - 1}")
    if temperature <= 0 or base_temperature <= 0:
        raise ValueError(f"temperature={temperature}, base_temperature={base_temperature} must be positive")

    with torch.autocast(features.device.type, enabled=False):
        own = features.float()
        contrast, all_labels, offset = _gather(own, labels, gather)
        device, anchors_per_row = own.device, len(anchor_views)
        if all_labels is None:  # self-supervised: positives are the other features of the same row
            all_labels = torch.arange(contrast.shape[0], device=device)
        flat = contrast.reshape(-1, dim)  # row b*V + v of the global batch
        anchors = own[:, anchor_views].reshape(-1, dim)  # row b*A + a of this process
        rows = torch.arange(batch, device=device).repeat_interleave(anchors_per_row)
        own_column = (offset + rows) * views + _index(tuple(anchor_views), device).repeat(batch)
        log_norm = _ContrastLogSumExp.apply(anchors, flat, own_column, temperature)  # [B*A] of a [B*A, B_global*V] row

        label_index = _group_index(all_labels.to(device))
        per_feature = label_index.repeat_interleave(views)
        groups = contrast.shape[0]  # at most one group per row: a size known without reading the labels
        sums = torch.zeros(groups, dim, device=device).index_add_(0, per_feature, flat)
        counts = torch.zeros(groups, dtype=torch.long, device=device).index_add_(
            0, per_feature, torch.ones_like(per_feature))
        anchor_label = label_index[offset + rows]
        num_pos = counts[anchor_label] - 1  # every feature with the anchor's label, less itself
        positive_logits = (anchors * (sums[anchor_label] - anchors)).sum(1) / temperature
        mean_log_prob = positive_logits / num_pos.clamp(min=1) - log_norm
        loss = -(temperature / base_temperature) * mean_log_prob
    return loss.view(batch, anchors_per_row), (num_pos > 0).view(batch, anchors_per_row)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Mean over the masked entries of every process; 0 (with a gradient path) when none is left.

    Each process sums its own entries and divides by the global count times 1/world: the mean of
    the processes' values is the global mean, and DDP's average of their gradients is the gradient
    of the global mean (the gather's backward already sums every process's share). ``gather`` False:
    this process's own mean (DDP's average of the gradients is then the mean of the processes' losses)."""
    total, count = torch.where(mask, values, 0.0).sum(), mask.sum()
    world, _ = _world()
    if world > 1 and gather:
        count = count.clone()
        dist.all_reduce(count)
        total = total * world
    return total / count.clamp(min=1)


def supcon_loss(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, temperature: float = 0.1,
                base_temperature: float = 0.07, anchor_views: Optional[Sequence[int]] = None,
                gather: bool = True) -> torch.Tensor:
    """Supervised contrastive loss over ``features [B, V, D]`` (L2-normalised), as docs/design.md states.

    Every feature in an ``anchor_views`` column is an anchor; its contrast set is every other
    feature of the (globally gathered) batch; its positives are those with the same label (or the
    same row when ``labels`` is None). Anchors without a positive are left out. Under several
    processes each returns its own anchors' share (``masked_mean``): their mean is the loss of the
    global batch, and the averaged gradients are its gradients.
    """
    loss, valid = supcon_terms(features, labels, temperature=temperature, base_temperature=base_temperature,
                               anchor_views=anchor_views, gather=gather)
    return masked_mean(loss, valid, gather)


def mix_targets(mix_lambda: torch.Tensor, first: torch.Tensor, second: torch.Tensor, columns: int) -> torch.Tensor:
    """MixCo's soft targets ``[M, columns]``: ``lambda`` at each mix's first source, ``1 - lambda`` at
    its second (every row sums to 1)."""
    rows = torch.arange(len(mix_lambda), device=mix_lambda.device)
    targets = torch.zeros(len(mix_lambda), columns, device=mix_lambda.device)
    targets[rows, first] = mix_lambda.float()
    return targets.index_put_((rows, second), 1 - mix_lambda.float(), accumulate=True)


def mix_contrast_loss(mixed: torch.Tensor, contrast: torch.Tensor, mix_lambda: torch.Tensor, first: torch.Tensor,
                      second: torch.Tensor, *, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """MixCo's soft InfoNCE: each mix ``mixed[m]`` (L2-normalised ``[M, D]``) against the contrast
    features of every process (``contrast [B, D]`` here, gathered with gradient), with target
    ``lambda`` on its first source ``contrast[first[m]]`` and ``1 - lambda`` on its second. The
    sources index this process's rows; their column in the global batch is offset by its rank.
    Returns this process's share of the global mean, as ``supcon_loss``."""
    with torch.autocast(mixed.device.type, enabled=False):
        gathered, _, offset = _gather(contrast.float(), None, gather)
        logits = mixed.float() @ gathered.T / temperature
        targets = mix_targets(mix_lambda, first + offset, second + offset, gathered.shape[0])
        per_mix = -(targets * logits.log_softmax(dim=1)).sum(dim=1)
    return masked_mean(per_mix, torch.ones_like(per_mix, dtype=torch.bool), gather)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


__all__ = ["cross_entropy", "masked_mean", "mix_contrast_loss", "mix_targets", "supcon_loss", "supcon_terms"]
