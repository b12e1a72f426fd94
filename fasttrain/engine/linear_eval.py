"""Linear evaluation (paper Section 5.1, Table 3): a frozen encoder in eval mode, a linear
classifier on the backbone feature and one on each sub-network feature, and their ensemble
(mean of logits); top-1/top-5 of each on the validation split, every sample counted once."""
from __future__ import annotations

import contextlib

import math
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from fasttrain.engine import checkpoint
from fasttrain.engine.optim import set_lr
from fasttrain.models import MultiExitResNet, exit_names
from fasttrain.recipe import Recipe, RecipeError
from loaders import LoaderRequest, build_loader, check_split


class ExitClassifiers(nn.Module):
    """One linear classifier per exit (sub-networks first, backbone last)."""

    def __init__(self, num_exits: int, dim: int, num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_exits))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, features)]


def _batch(recipe: Recipe, accelerator: Accelerator) -> int:
    return max(1, recipe.linear_eval.batch_size // accelerator.num_processes)


def eval_loader(recipe: Recipe, accelerator: Accelerator, split: str, augment: str, subset: Optional[int] = None,
                crop_scale: Optional[tuple[float, float]] = None):
    """A one-view loader for evaluating a frozen encoder (linear evaluation, k-NN)."""
    batch = _batch(recipe, accelerator)
    # one view, at its own scale: data.crop_scale or linear_eval.crop_scale, never a training view's
    data = recipe.data.model_copy(update={"crop_scale": crop_scale or recipe.data.crop_scale, "view_crop_scales": None})
    return build_loader(recipe.loader, data, LoaderRequest(
        split=split, batch_size=batch, augment=augment, num_views=1, device=accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=recipe.train.seed + 1,
        channels_last=recipe.train.channels_last, subset=subset))


@torch.no_grad()
def encode(encoder: MultiExitResNet, accelerator: Accelerator, image: torch.Tensor) -> list[torch.Tensor]:
    """Pooled features of every exit (sub-networks first, backbone last), float32, no projection."""
    with accelerator.autocast():
        return [f.float() for f in encoder(image, project=False).features]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).float()


@torch.no_grad()
def evaluate(logit_fn, loader, accelerator: Accelerator, num_exits: int) -> dict:
    """Top-1/top-5 (%) of each exit's classifier (``logit_fn(image)``: their logits, sub-networks
    first, backbone last) and, with several, of their ensemble (mean of logits). Counts are summed
    over processes, and each process sees its own shard without padding, so every readable sample
    counts exactly once (``skipped_images``: the unreadable ones, left out). ``subnetwork`` is the
    first sub-network's entry of ``exits``."""
    names = exit_names(num_exits) + (["ensemble"] if num_exits > 1 else [])
    correct = torch.zeros(len(names), 2, device=accelerator.device)
    nonfinite = torch.zeros(len(names), device=accelerator.device)  # samples whose logits are NaN/Inf
    seen = torch.zeros((), device=accelerator.device)
    for views, labels in loader:
        per_exit = logit_fn(views[0])
        if num_exits > 1:
            per_exit = [*per_exit, torch.stack(per_exit).mean(0)]
        for i, logits in enumerate(per_exit):
            correct[i] += topk_correct(logits, labels)
            nonfinite[i] += (~torch.isfinite(logits).all(dim=1)).sum()
        seen += labels.numel()
    skipped = torch.tensor(float(len(loader.skipped)), device=accelerator.device)
    correct, seen = accelerator.reduce(correct, reduction="sum"), accelerator.reduce(seen, reduction="sum")
    nonfinite = accelerator.reduce(nonfinite, reduction="sum").tolist()
    acc = (100 * correct / seen.clamp(min=1)).tolist()
    # a classifier whose logits are not numbers has no accuracy: its top-k picks are arbitrary
    result = {name: ({"top1": a[0], "top5": a[1]} if not bad else
                     {"top1": None, "top5": None, "nonfinite_samples": int(bad)})
              for name, a, bad in zip(names, acc, nonfinite)}
    return {"backbone": result["backbone"], "subnetwork": result.get("sub0"),
            "ensemble": result.get("ensemble"), "exits": result, "samples": int(seen),
            "skipped_images": int(accelerator.reduce(skipped, reduction="sum"))}


def check_evaluation(recipe: Recipe, evaluation: str, train_images: int) -> None:
    """What the evaluation after pretraining (``linear`` or ``classifier``) will read, checked before
    the first step."""
    linear = evaluation == "linear"
    if not linear or recipe.linear_eval.enabled:
        check_split(recipe.loader, recipe.data, "val")
    if linear and recipe.linear_eval.enabled and recipe.linear_eval.batch_size > train_images:
        raise RecipeError(f"linear_eval.batch_size={recipe.linear_eval.batch_size}: more than the {train_images} "
                          f"training images it reads; lower it")


def classifier_eval(recipe: Recipe, accelerator: Accelerator, model: MultiExitResNet) -> dict:
    """1-stage evaluation (`ce`, `dsn`, `cds`): the accuracy of the classifiers trained with the
    encoder: the backbone's, and where every exit has one (`dsn`), each exit's and their ensemble."""
    model.eval()

    def logits(image):
        with accelerator.autocast():
            out = model(image, project=False)
        return [x.float() for x in (*out.sub_logits, out.logits)]

    num_exits = 1 + len(model.exit_classifiers or ())
    return evaluate(logits, eval_loader(recipe, accelerator, "val", "center"), accelerator, num_exits)


def linear_eval(recipe: Recipe, accelerator: Accelerator, encoder: MultiExitResNet) -> dict:
    cfg = recipe.linear_eval
    encoder.eval().requires_grad_(False)
    train = eval_loader(recipe, accelerator, "train", "center" if cfg.cache_features else "basic",
                        crop_scale=cfg.crop_scale)
    classifiers = ExitClassifiers(encoder.num_exits, encoder.feature_dim, train.num_classes).to(accelerator.device)
    optimizer = torch.optim.SGD(classifiers.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.lr
    with _eager(accelerator):  # tiny heads: compiling costs more than it saves, and again on the last batch
        classifiers, optimizer = accelerator.prepare(classifiers, optimizer)

    cache = encode_split(train, encoder, accelerator) if cfg.cache_features else None
    per_epoch = len(train)
    total, update = cfg.epochs * per_epoch, 0
    for epoch in range(cfg.epochs):
        train.set_epoch(epoch)
        batches = _reshuffled(cache, _batch(recipe, accelerator), epoch) if cache else (
            (encode(encoder, accelerator, views[0]), labels) for views, labels in train)
        bar = tqdm(batches, total=per_epoch, desc=f"linear eval {epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        for features, labels in bar:
            set_lr(optimizer, _factor(cfg, update, total, per_epoch))
            loss = sum(F.cross_entropy(logits, labels) for logits in classifiers(features))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            update += 1
            if update % 10 == 0:
                bar.set_postfix(loss=f"{loss.item() / encoder.num_exits:.3f}")

    classifiers.eval()
    if accelerator.is_main_process:  # kept for export (python -m fasttrain.export)
        heads = accelerator.unwrap_model(classifiers).heads
        checkpoint.atomic_save({name: {k: v.detach().cpu() for k, v in head.state_dict().items()}
                                for name, head in zip(exit_names(len(heads)), heads)},
                               Path(recipe.run.dir) / checkpoint.LINEAR_CLASSIFIERS)
    def logits(image):
        return classifiers(encode(encoder, accelerator, image))

    return evaluate(logits, eval_loader(recipe, accelerator, "val", "center"), accelerator, encoder.num_exits)


@contextlib.contextmanager
def _eager(accelerator: Accelerator):
    """Accelerate's prepare() without torch.compile, whatever train.compile says."""
    from accelerate.utils import DynamoBackend
    plugin = accelerator.state.dynamo_plugin
    backend, plugin.backend = plugin.backend, DynamoBackend.NO
    try:
        yield
    finally:
        plugin.backend = backend


def _factor(cfg, update: int, total: int, per_epoch: int) -> float:
    """The linear classifiers' lr factor: ``gamma`` per milestone passed, or a cosine to 0."""
    if cfg.milestones:
        return cfg.gamma ** sum(update >= m * per_epoch for m in cfg.milestones)
    return 0.5 * (1 + math.cos(math.pi * update / total))


def encode_split(loader, encoder, accelerator, desc: str = "encoding train split"):
    """Encode a one-view loader once: per-exit features [N, D] and labels [N] of this process."""
    features, labels = [], []
    for views, y in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process,
                         dynamic_ncols=True):
        features.append(encode(encoder, accelerator, views[0]))
        labels.append(y)
    return [torch.cat(f) for f in zip(*features)], torch.cat(labels)


def _reshuffled(cache, batch: int, epoch: int) -> Iterator:
    features, labels = cache
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch)).to(labels.device)
    for start in range(0, len(order) - batch + 1, batch):
        index = order[start:start + batch]
        yield [f[index] for f in features], labels[index]
