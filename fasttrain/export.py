"""A trained encoder as a plain torchvision ResNet, for use outside this project.

    python -m fasttrain.export runs/r50_selfcon/checkpoint.pt resnet50.pt [--exits]

``resnet50.pt`` is a state dict that loads with ``strict=True`` into ``torchvision.models.resnet50()``:
with its ``fc`` when the run has a linear head (the classifier of a ``ce`` run, or the backbone's
linear-evaluation classifier saved beside the checkpoint as ``linear_classifiers.pt``), otherwise
into a ResNet whose ``fc`` is ``nn.Identity()`` (it then returns the pooled backbone feature).
A small-image stem (``model.stem: cifar``) needs the same two-line change to torchvision's model
that the project makes; the command prints what to run. ``--exits`` also writes the sub-networks
and projection heads, and a deep-supervision run's exit classifiers (``NAME.exits.pt``), which have
no torchvision counterpart.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


_STEM = {"stem.0.": "conv1.", "stem.1.": "bn1."}


def torchvision_state_dict(model_state: dict, linear_head: dict | None = None) -> dict:
    """The backbone's tensors under torchvision's names; ``fc`` from ``linear_head`` ({weight, bias})
    or from the model's own classifier, if any."""
    out = {}
    for name, tensor in model_state.items():
        for ours, theirs in _STEM.items():
            if name.startswith(ours):
                out[theirs + name[len(ours):]] = tensor
        if name.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
            out[name] = tensor
    head = linear_head or {k.removeprefix("classifier."): v for k, v in model_state.items()
                           if k.startswith("classifier.")}
    if head:
        out["fc.weight"], out["fc.bias"] = head["weight"], head["bias"]
    return out


def exits_state_dict(model_state: dict) -> dict:
    return {k: v for k, v in model_state.items() if k.startswith(("subnetworks.", "heads.", "exit_classifiers."))}


def load_line(arch: str, stem: str, num_classes: int | None, path: Path) -> str:
    """What a user types to get the exported encoder back."""
    lines = [f"model = torchvision.models.{arch}({f'num_classes={num_classes}' if num_classes else ''})"]
    if stem == "cifar":
        lines += ["model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)", "model.maxpool = torch.nn.Identity()"]
    if not num_classes:
        lines.append("model.fc = torch.nn.Identity()")
    lines.append(f"model.load_state_dict(torch.load('{path}'), strict=True)")
    return "; ".join(lines)


def export(checkpoint_path: Path, out: Path, exits: bool = False) -> dict:

    from fasttrain.engine import checkpoint

    from fasttrain.errors import CheckpointError

    linear = checkpoint_path.with_name(checkpoint.LINEAR_CLASSIFIERS)
    for source in (checkpoint_path, linear):
        if out.resolve() == source.resolve() or (out.exists() and source.exists() and out.samefile(source)):
            raise CheckpointError(f"OUT: {out} is {source}, which this export reads; choose another path")
    state = checkpoint.load(checkpoint_path, "CHECKPOINT")
    recipe = checkpoint.recipe_of(state)
    head = None
    if linear.is_file():
        heads = checkpoint.read_tensors(linear, "CHECKPOINT's linear classifiers", "linear-classifier file")
        head = heads.get("backbone") if isinstance(heads, dict) else None
        if not (isinstance(head, dict) and {"weight", "bias"} <= set(head)):
            raise CheckpointError(f"{linear} is not a linear-classifier file of this project (no backbone "
                                  f"weight and bias); move it away to export the encoder without its classifier")
    tensors = torchvision_state_dict(state["model"], head)
    checkpoint.atomic_save(tensors, out)
    written = [out]
    if exits and exits_state_dict(state["model"]):
        extra = out.with_name(f"{out.stem}.exits.pt")
        checkpoint.atomic_save({"exits": list(recipe.model.exits), "exit_kind": recipe.model.exit_kind,
                                "state_dict": exits_state_dict(state["model"])}, extra)
        written.append(extra)
    num_classes = tensors["fc.weight"].shape[0] if "fc.weight" in tensors else None
    return {"written": written, "arch": recipe.model.arch, "num_classes": num_classes,
            "load": load_line(recipe.model.arch, recipe.model.stem, num_classes, out)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttrain.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    parser.add_argument("out", metavar="OUT", type=Path, help="the torchvision state dict to write (.pt)")
    parser.add_argument("--exits", action="store_true", help="also write the sub-networks and heads (OUT.exits.pt)")
    args = parser.parse_args(argv)
    from fasttrain.faults import one_line_errors

    return one_line_errors("fasttrain.export", lambda: _export(args))


def _export(args) -> int:
    from fasttrain.errors import CheckpointError

    if not args.checkpoint.is_file():
        raise CheckpointError(f"CHECKPOINT: no such file: {args.checkpoint}")
    summary = export(args.checkpoint, args.out, args.exits)
    fc = f"fc of {summary['num_classes']} classes" if summary["num_classes"] else "no fc"
    print(f"wrote {', '.join(map(str, summary['written']))} ({summary['arch']}, {fc}). "
          f"Load it with:\n  {summary['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
