"""Optimizer and learning-rate schedule: SGD (fused) or LARS, linear warm-up then cosine (or step
decay), set every step."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from timm.optim import Lars
from timm.optim._param_groups import param_groups_weight_decay

from fasttrain.recipe import OptimConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """BatchNorm weights and biases (the 1-d parameters) get no weight decay when
    ``exclude_bn_bias``; timm's LARS then also leaves them unadapted (it adapts only groups
    with weight decay, unless ``always_adapt``)."""
    if cfg.exclude_bn_bias:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    if cfg.name == "sgd":  # fused: one kernel per step, and it skips an update on the device (found_inf)
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    else:
        optimizer = Lars(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                         trust_coeff=cfg.lars_trust_coeff, always_adapt=not cfg.exclude_bn_bias)
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.lr
    return optimizer


def lr_factor(update: int, total_updates: int, warmup_updates: int, final_ratio: float,
              milestones: Sequence[int] = (), gamma: float = 0.1, *, updates_per_epoch: Optional[int] = None,
              warmup_start: Optional[float] = None, cosine_offset: int = 0,
              cosine_updates: Optional[int] = None) -> float:
    """Multiplier of the base lr at optimizer update ``update`` (0-based): warm-up, then cosine to
    ``final_ratio``, or, with ``milestones`` (updates), ``gamma`` per milestone passed.

    Per update (``updates_per_epoch`` None): the warm-up rises linearly to 1, the cosine runs from the
    warm-up's end to ``total_updates``. Per epoch (the official SupCon/SelfCon code): the lr changes
    once per epoch, at step ``epoch + 1 - cosine_offset`` (epochs) of a cosine ``cosine_updates`` long
    (default: all epochs, the warm-up's included), and the warm-up (still per update) rises from
    ``warmup_start`` to the cosine's value at its last epoch. ``warmup_start``: the warm-up's first
    factor (default: 1/warmup_updates, a linear rise from 0)."""
    if updates_per_epoch is None:
        if update < warmup_updates:
            start = 0.0 if warmup_start is None else warmup_start
            return start + (1 - start) * (update + 1) / warmup_updates
        if milestones:
            return gamma ** sum(update >= m for m in milestones)
        progress = min(1.0, (update - warmup_updates) / max(1, total_updates - warmup_updates))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def at_epoch(epoch: int) -> float:
        if milestones:
            return gamma ** sum(epoch * updates_per_epoch >= m for m in milestones)
        length = (cosine_updates or total_updates) / updates_per_epoch
        progress = min(1.0, max(0.0, (epoch + 1 - cosine_offset / updates_per_epoch) / length))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if update < warmup_updates:
        start = 0.0 if warmup_start is None else warmup_start
        target = at_epoch(warmup_updates // updates_per_epoch - 1)
        return start + (target - start) * update / warmup_updates
    return at_epoch(update // updates_per_epoch)


def schedule_for(cfg: ScheduleConfig, base_lr: float, updates_per_epoch: int):
    """``update -> lr factor`` of a recipe's schedule, for an epoch of ``updates_per_epoch`` updates."""
    per_epoch = updates_per_epoch if cfg.granularity == "epoch" else None
    return functools.partial(
        lr_factor, total_updates=updates_per_epoch * cfg.epochs,
        warmup_updates=round(cfg.warmup_epochs * updates_per_epoch), final_ratio=cfg.final_lr_ratio,
        milestones=[round(m * updates_per_epoch) for m in cfg.milestones], gamma=cfg.gamma,
        updates_per_epoch=per_epoch,
        warmup_start=None if cfg.warmup_start_lr is None else cfg.warmup_start_lr / base_lr,
        cosine_offset=round(cfg.cosine_offset_epochs * updates_per_epoch),
        cosine_updates=None if cfg.cosine_epochs is None else cfg.cosine_epochs * updates_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
