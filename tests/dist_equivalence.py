"""Launched by test_run.py with 1 and with 2 processes: for each method of a comma-separated list,
the loss and the gradients of one training step on the same global batch, written to OUT/<method>.pt
(by the main process). One launch for every method: the launches, not the steps, take the time.

MixCo mixes within each process (image i with i + B/2 of the process's own batch), so one process
and two do not make the same mixes; ``mixco`` compares its loss function instead: the same mixes,
sources and lambdas laid out as two processes hold them, gradients with respect to the features."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fasttrain.engine.trainer import build_model, make_accelerator  # noqa: E402
from fasttrain.recipe import objective  # noqa: E402
from fasttrain.methods import get_method  # noqa: E402
from fasttrain.recipe import Recipe  # noqa: E402


def mixco_loss(accelerator, out: str) -> None:
    from fasttrain.losses import mix_contrast_loss
    gen = torch.Generator().manual_seed(1)
    contrast = F.normalize(torch.randn(12, 8, generator=gen), dim=1).requires_grad_()
    mixed = F.normalize(torch.randn(6, 8, generator=gen), dim=1).requires_grad_()
    lam = torch.rand(6, generator=gen)
    # the two-process layout: process p holds contrast rows 6p..6p+5 and mixes 3p..3p+2 of its rows i, i + 3
    first = torch.tensor([6 * (m // 3) + m % 3 for m in range(6)])
    world, rank = accelerator.num_processes, accelerator.process_index
    mix_rows, contrast_rows = slice(rank * 6 // world, (rank + 1) * 6 // world), slice(rank * 12 // world,
                                                                                          (rank + 1) * 12 // world)
    local_first = first[mix_rows] - rank * 12 // world
    loss = mix_contrast_loss(mixed[mix_rows], contrast[contrast_rows], lam[mix_rows], local_first, local_first + 3,
                             temperature=0.5)
    loss.backward()
    grads = {n: accelerator.reduce(t.grad, reduction="mean") for n, t in (("mixed", mixed), ("contrast", contrast))}
    loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        torch.save({"loss": loss.item(), "grads": grads}, out)


def main(methods: str, out: str) -> None:
    for method_name in methods.split(","):
        step(method_name, str(Path(out) / f"{method_name}.pt"))


def step(method_name: str, out: str) -> None:
    model = {"arch": "resnet18", "stem": "cifar"}
    if method_name in ("dsn", "cds"):  # every exit kind of its own, and a term per exit
        model.update(exits=["layer1", "layer2", "layer3"], exit_kind="sepconv", head="none")
    recipe = Recipe.model_validate({"method": method_name, "model": model,
                                    "train": {"precision": "fp32", "channels_last": False},
                                    "run": {"dir": str(Path(out).parent / "run")}})
    accelerator = make_accelerator(recipe, log_with=())
    if method_name == "mixco":
        return mixco_loss(accelerator, out)
    method = get_method(method_name)
    torch.manual_seed(0)
    model = build_model(recipe, method, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    batch = 12
    views = [torch.randn(batch, 3, 16, 16, generator=gen) for _ in range(method.num_views)]
    # singletons 1, 2, 9 on process 0 and 6 on process 1: with one view they have no positive, so the
    # processes hold different numbers of valid anchors (SupCon-S's mean must use the global count)
    labels = torch.tensor([0, 0, 1, 2, 9, 3, 3, 4, 4, 5, 5, 6])
    share = batch // accelerator.num_processes
    rows = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    model = accelerator.prepare(model)
    model.eval()  # BatchNorm on running statistics: per-process batch statistics would differ by design
    loss, _ = objective(recipe)(model, [v[rows] for v in views], labels[rows])
    accelerator.backward(loss)
    loss = accelerator.reduce(loss.detach(), reduction="mean")  # each process holds its anchors' share
    grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
             if p.grad is not None}
    if accelerator.is_main_process:
        torch.save({"loss": loss.item(), "grads": grads}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
