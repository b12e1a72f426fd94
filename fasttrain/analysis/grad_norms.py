"""Gradient flow (SelfCon paper, Fig. 4): from one set of weights and one real batch, the gradient
norm of every backbone block and every backbone convolution under SupCon and under SelfCon-M.

    python -m fasttrain.analysis.grad_norms recipes/demo_selfcon.yaml [key=value ...] [--batches 4]

The encoder is the recipe's multi-exit model (its ``model.exits``), initialised with the recipe's
seed (or loaded from ``--checkpoint``). SupCon reads only the backbone's projection of the two
views, so its gradient reaches the backbone only through layer4; SelfCon-M also contrasts the
sub-network's projections, whose gradient enters the backbone at the exit point. Each method gets
a copy of the same model in training mode (BatchNorm on batch statistics, as in training) and the
same batches; nothing is updated. Writes ``grad_norms.json``, ``grad_norms.md`` and
``grad_norms.png`` (bars per block and per conv, the exit point marked) into ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
from pathlib import Path


from torch import nn
from tqdm.auto import tqdm

from fasttrain.analysis.common import pyplot, save_png, write_json
from fasttrain.faults import one_line_errors
from fasttrain.files import write_bytes
from fasttrain.models import EncoderOutput, MultiExitResNet
from fasttrain.models.multi_exit import STAGES

METHODS = ("supcon", "selfcon_m")


class BackboneOnly(nn.Module):
    """The encoder as SupCon sees it: only the backbone exit reaches the loss (the sub-networks'
    outputs are dropped, so no gradient flows through them)."""

    def __init__(self, encoder: MultiExitResNet):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, project: bool = True) -> EncoderOutput:
        out = self.encoder(x, project)
        return EncoderOutput(out.features[-1:], out.projections[-1:], out.logits, [])


def backbone_blocks(model: MultiExitResNet) -> dict[str, nn.Module]:
    """The stem and every residual block, in forward order: ``stem``, ``layer1.0``, ..."""
    blocks = {"stem": model.stem}
    for stage in STAGES:
        blocks.update({f"{stage}.{i}": block for i, block in enumerate(getattr(model, stage))})
    return blocks


def backbone_convs(model: MultiExitResNet) -> dict[str, nn.Conv2d]:
    return {f"{name}.{sub}".rstrip("."): m for name, block in backbone_blocks(model).items()
            for sub, m in block.named_modules() if isinstance(m, nn.Conv2d)}


def _norm(params) -> float:
    squares = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return math.sqrt(float(sum(squares))) if squares else 0.0


def gradient_norms(model: MultiExitResNet, objectives: dict, batches: list) -> dict:
    """``{method: {"blocks": {name: norm}, "convs": {name: norm}, "loss": mean loss}}``: the norm of
    the gradient of the mean loss over ``batches``, from a copy of ``model`` per method."""
    out = {}
    for name, objective in objectives.items():
        encoder = copy.deepcopy(model).train()
        forward = BackboneOnly(encoder) if not objective.method.uses_subnetwork else encoder
        losses = []
        for views, labels in batches:
            loss, _ = objective(forward, views, labels)
            (loss / len(batches)).backward()
            losses.append(float(loss.detach()))
        out[name] = {"blocks": {b: _norm(m.parameters()) for b, m in backbone_blocks(encoder).items()},
                     "convs": {c: _norm(m.parameters()) for c, m in backbone_convs(encoder).items()},
                     "loss": sum(losses) / len(losses)}
    return out


def ratios_around_the_exit(norms: dict, exit_point: str) -> dict:
    """Geometric mean of SelfCon-M / SupCon block norms up to and including the exit point's stage,
    and after it: the paper's claim is the first is the larger (the sub-network's gradient enters there)."""
    first, second = METHODS
    blocks = list(norms[first]["blocks"])
    cut = max(i for i, b in enumerate(blocks) if b.startswith(exit_point + ".")) + 1

    def mean_ratio(names):
        logs = [math.log(norms[second]["blocks"][b] / norms[first]["blocks"][b]) for b in names]
        return math.exp(sum(logs) / len(logs))

    return {"before_exit": mean_ratio(blocks[:cut]), "after_exit": mean_ratio(blocks[cut:])}


def table(norms: dict, exit_points) -> str:
    first, second = METHODS
    lines = [f"| block | {first} | {second} | {second} / {first} |", "|---|---:|---:|---:|"]
    blocks = list(norms[first]["blocks"])
    exits_after = {max(b for b in blocks if b.startswith(p + ".")) for p in exit_points}
    for block in blocks:
        a, b = norms[first]["blocks"][block], norms[second]["blocks"][block]
        mark = " (exit after)" if block in exits_after else ""
        lines.append(f"| {block}{mark} | {a:.4g} | {b:.4g} | {b / a if a else float('inf'):.2f} |")
    around = ratios_around_the_exit(norms, exit_points[0])
    lines.append(f"\nSub-network exits after: {', '.join(exit_points)}; {second} / {first} (geometric mean over "
                 f"blocks): {around['before_exit']:.2f} up to the first exit, {around['after_exit']:.2f} after it; "
                 f"losses: " + ", ".join(f"{m} {norms[m]['loss']:.4f}" for m in METHODS))
    return "\n".join(lines)


def plot(norms: dict, exit_points, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(2, 1, figsize=(12, 7), constrained_layout=True)
    for ax, kind in zip(axes, ("blocks", "convs")):
        names = list(norms[METHODS[0]][kind])
        for k, method in enumerate(METHODS):
            ax.bar([i + (k - 0.5) * 0.4 for i in range(len(names))], [norms[method][kind][n] for n in names],
                   width=0.4, label=method)
        for point in exit_points:  # a line after the last block of the stage the sub-network attaches to
            last = max(i for i, n in enumerate(names) if n.startswith(point + "."))
            ax.axvline(last + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.text(last + 0.55, ax.get_ylim()[1] * 0.95, f"exit after {point}", fontsize=8, va="top")
        ax.set_xticks(range(len(names)), names, rotation=90 if kind == "convs" else 45, fontsize=7)
        ax.set_ylabel("gradient norm")
        ax.set_title(f"per {kind[:-1]}: gradient norm from the same weights and batches")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_png(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (its model, data, loss temperatures and seed are used)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=64")
    parser.add_argument("--checkpoint", help="start from these weights instead of the recipe's initialisation")
    parser.add_argument("--batches", type=int, default=1, help="real training batches averaged (default 1)")
    parser.add_argument("--out", help="output folder (default: <run.dir>/analysis)")
    args = parser.parse_intermixed_args(argv)
    return one_line_errors("grad_norms", lambda: _main(args))


def _main(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from fasttrain.engine import checkpoint
    from fasttrain.engine.trainer import build_model, train_loader
    from fasttrain.methods import Objective, get_method
    from fasttrain.recipe import RecipeError, load_recipe, objective

    if args.batches < 1:
        raise RecipeError(f"--batches={args.batches}: must be at least 1")
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.model.exits:
        raise RecipeError("model.exits is empty: SelfCon-M needs a sub-network exit to compare with")
    set_seed(recipe.train.seed)
    model = build_model(recipe, get_method("selfcon_m"), num_classes=None)
    if args.checkpoint:
        state = checkpoint.load(Path(args.checkpoint), "--checkpoint")
        model.load_state_dict({k: v for k, v in state["model"].items() if "classifier" not in k}, strict=False)
    chosen = objective(recipe)  # the recipe's temperatures, as every method of the comparison uses them
    objectives = {m: Objective(get_method(m), temperature=chosen.temperature,
                               base_temperature=chosen.base_temperature) for m in METHODS}
    loader = train_loader(recipe, Accelerator(cpu=True), get_method("supcon"))
    batches = [(tuple(v.cpu() for v in views), labels.cpu())
               for views, labels in tqdm(itertools.islice(loader, args.batches), total=args.batches, desc="batches")]
    if len(batches) < args.batches:
        raise RecipeError(f"--batches={args.batches}: the training split has only {len(batches)} batches")
    norms = gradient_norms(model, objectives, batches)
    out = Path(args.out) if args.out else Path(recipe.run.dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"recipe": str(args.recipe), "overrides": args.overrides, "checkpoint": args.checkpoint,
               "exit_points": list(model.exit_points), "batches": args.batches,
               "batch_size": batches[0][1].shape[0],
               "ratio_selfcon_m_to_supcon": ratios_around_the_exit(norms, model.exit_points[0]), "norms": norms}
    write_json(out / "grad_norms.json", payload)
    text = table(norms, model.exit_points)
    write_bytes(out / "grad_norms.md", (text + "\n").encode())
    plot(norms, model.exit_points, out / "grad_norms.png")
    print(text)
    print(f"wrote {out / 'grad_norms.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
