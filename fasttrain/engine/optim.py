"""Optimizer and learning-rate schedule: SGD (fused) or LARS, linear warm-up then cosine (or step
decay), set every step."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from timm.optim import Lars
from timm.optim._param_groups import param_groups_weight_decay

from fasttrain.recipe import OptimConfig


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
              milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr at optimizer update ``update`` (0-based): linear warm-up, then cosine
    to ``final_ratio``, or, with ``milestones`` (updates), ``gamma`` per milestone passed."""
    if update < warmup_updates:
        return (update + 1) / warmup_updates
    if milestones:
        return gamma ** sum(update >= m for m in milestones)
    progress = min(1.0, (update - warmup_updates) / max(1, total_updates - warmup_updates))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
