"""k-NN accuracy of every exit and of their ensemble: online (is the encoder learning, epoch by
epoch?) and offline (``run.py --eval-only CHECKPOINT --knn``: whole splits, top-1 and top-5).

The model in eval mode encodes a feature bank (train split, center crops; online a seeded subset,
the same images every time; gathered across processes) and the validation split (online a seeded
subset); each validation image is classified by a weighted vote of its k nearest bank features
(solo-learn's and InstDisc's rule: cosine similarity, weights exp(sim / T), k = 20, T = 0.07).
The ensemble adds the exits' normalised votes. A torch top-k over a dense similarity chunk is
all this needs at bank sizes that cost a small fraction of an epoch, so no index library is used.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from fasttrain.engine.linear_eval import encode_split, eval_loader, topk_correct
from fasttrain.models import MultiExitResNet, exit_names
from fasttrain.recipe import Recipe


@torch.no_grad()
def knn_votes(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int = 20,
              temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class votes ``[Q, C]`` (rows sum to 1) of ``query [Q, D]`` from its k nearest rows of ``bank [N, D]``."""
    query, bank = F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    votes = []
    for rows in query.split(chunk):
        sim, index = (rows @ bank.T).topk(k, dim=1)  # sorted: column 0 is the nearest
        weights = ((sim - sim[:, :1]) / temperature).exp()  # exp(sim/T) / exp(max/T): never overflows
        scores = torch.zeros(rows.shape[0], num_classes, device=rows.device)
        votes.append(scores.scatter_add_(1, bank_labels[index], weights))
    votes = torch.cat(votes)
    return votes / votes.sum(1, keepdim=True)


def _gather_rows(accelerator: Accelerator, x: torch.Tensor) -> torch.Tensor:
    """Rows of every process (their counts may differ by one batch), in process order."""
    if accelerator.num_processes == 1:
        return x
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(x, dim=0))
    longest = max(counts)
    return torch.cat([padded[i * longest: i * longest + n] for i, n in enumerate(counts)])


class KNNMonitor:
    """``monitor(model) -> {exit: top-1 %, ..., "ensemble": top-1 %}`` on seeded subsets (the online
    curve); ``monitor.evaluate(model)`` adds top-5 and counts (the offline ``--knn`` evaluation, which
    uses whole splits). Its loaders are built here, so that a missing or unusable split stops a run
    before its first step, not after an epoch."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator, bank: Optional[int], val: Optional[int], k: int,
                 temperature: float):
        """``bank``/``val``: images of the train/val split used (None: all)."""
        self.accelerator, self.k, self.temperature = accelerator, k, temperature
        self.loaders = (eval_loader(recipe, accelerator, "train", "center", bank),
                        eval_loader(recipe, accelerator, "val", "center", val))

    @classmethod
    def online(cls, recipe: Recipe, accelerator: Accelerator) -> "KNNMonitor":
        cfg = recipe.monitor
        return cls(recipe, accelerator, cfg.knn_bank, cfg.knn_val, cfg.knn_k, cfg.knn_temperature)

    def __call__(self, model: MultiExitResNet) -> dict:
        result = self.evaluate(model)
        return {name: result[name]["top1"] for name in result["exits"]}

    @torch.no_grad()
    def evaluate(self, model: MultiExitResNet) -> dict:
        bank_loader, val_loader = self.loaders
        was_training = model.training
        model.eval()
        bank, bank_labels = encode_split(bank_loader, model, self.accelerator, "k-NN bank")
        bank = [_gather_rows(self.accelerator, f) for f in bank]
        bank_labels = _gather_rows(self.accelerator, bank_labels)
        query, labels = encode_split(val_loader, model, self.accelerator, "k-NN val")
        model.train(was_training)

        classes = max(bank_loader.num_classes, val_loader.num_classes)
        votes = [knn_votes(q, b, bank_labels, classes, self.k, self.temperature) for q, b in zip(query, bank)]
        names = exit_names(len(votes))
        if len(votes) > 1:
            votes.append(torch.stack(votes).sum(0))
            names.append("ensemble")
        correct = torch.stack([topk_correct(v, labels) for v in votes])
        correct = self.accelerator.reduce(correct, reduction="sum")
        seen = self.accelerator.reduce(torch.tensor(float(labels.numel()), device=correct.device), reduction="sum")
        accuracy = (100 * correct / seen.clamp(min=1)).tolist()
        return {"k": self.k, "temperature": self.temperature, "bank_images": int(bank_labels.numel()),
                "samples": int(seen), "exits": names,
                **{name: {"top1": a[0], "top5": a[1]} for name, a in zip(names, accuracy)}}
