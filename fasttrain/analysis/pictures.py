"""Where each exit looks, and how it arranges the classes (SelfCon paper, Fig. 5):

    python -m fasttrain.analysis.pictures runs/demo_selfcon/checkpoint.pt [--images 8] [--embed-images 500]

* ``gradcam.png``: Grad-CAM of every exit on a few images of ``--split`` (rows, taking the classes
  in turn), beside the image itself. By default each exit's map is taken at the last convolutional
  feature map of that exit's own path: ``layer4`` for the backbone, the last conv stage inside the
  sub-network for a SelfCon sub-network, and, for an ``exit_kind: fc`` sub-network (pool + Linear,
  no conv of its own), the output of the stage it attaches to. ``--layer shared`` takes every
  exit's map at the output of the stage the first sub-network attaches to, as the paper's Fig. 5
  does: the columns then differ only in where each exit's gradient points.
* ``embedding.png``: a 2-D t-SNE (or UMAP) of every exit's pooled features, coloured by class.
* ``pictures.json`` / ``pictures.md``: the images, the exits and their CAM layers, the target, and
  how separated the classes are in each exit's features: the leave-one-out k-NN top-1 (k=5,
  cosine, the k-NN monitor's exp(sim/0.07) vote) on the pooled features, and the silhouette of the
  2-D embedding (what the picture shows).

The Grad-CAM target. A contrastive encoder has no class score, so by default (``--target
class-mean``) the score of an image at an exit is <f, u_y - mean_c u_c>: its pooled feature f
against the unit mean feature u_y of its class, less the average of all classes' unit means (means
over the embedding images: the shown rows alone would hold most classes once). It is the linear
score of a nearest-class-mean classifier on the features that the linear evaluation and the
embedding panel read (at ``layer4`` the map is that classifier's classical CAM); linear in f, it
never saturates, and with unit means a class of small features is not outvoted by one of large.
The SupCon-like alternative, ``--target projection`` (the cosine of the exit's L2-normalised
projection to the normalised mean projection of its class: the positive term of the SupCon/SelfCon
loss), saturates on a trained encoder: images sit at cosine 0.97-1.0 of their prototype, the
gradient on the sphere is a small residual, and most maps are negative everywhere (all zero after
Grad-CAM's ReLU; such cells say "no positive evidence"). ``--target logit`` takes the true class's
logit, on encoders with a classifier on every exit (``ce``; ``dsn``, ``cds``).

Grad-CAM is torchcam's (``pip install -e '.[analysis]'``): its ``targets`` take any per-image
scalar, so these scores need no hand-written hooks.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Optional


import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fasttrain.analysis.common import (eval_batches, load_trained, pyplot, save_png,
                                      write_json)
from fasttrain.faults import one_line_errors
from fasttrain.files import write_bytes
from fasttrain.models import MultiExitResNet, exit_names
from fasttrain.recipe import RecipeError

PROG = "fasttrain.analysis.pictures"
CELL, HEADER, DPI = 1.5, 0.7, 100  # inches per Grad-CAM cell, inches for the titles; whole pixels
PANEL, LEGEND = 4.0, 1.6  # inches per embedding panel, for the class legend
KNN_K, KNN_TEMPERATURE = 5, 0.07
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}
TARGETS = {
    "class-mean": "<pooled feature, unit mean feature of its class - average unit class mean> (embedding images)",
    "projection": "cosine of the exit's projection to the normalised mean projection of its class (embedding images)",
    "logit": "logit of the true class",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt of a run (or its run dir)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--images", type=int, default=8, help="rows of the Grad-CAM grid")
    p.add_argument("--embed-images", type=int, default=500, help="images in the 2-D embedding")
    p.add_argument("--method", default="tsne", choices=("tsne", "umap"), help="2-D embedding")
    p.add_argument("--target", default="class-mean", choices=TARGETS, help="Grad-CAM score (see above)")
    p.add_argument("--layer", default="own", choices=("own", "shared"),
                   help="CAM at each exit's own last conv map, or all at the first exit point (paper Fig. 5)")
    p.add_argument("--out", type=Path, help="output folder (default: <run dir>/analysis)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. data.val=...")

    def one_line(message):  # argparse's usage block would make a bad flag two lines
        raise RecipeError(message)

    p.error = one_line
    args = p.parse_args(argv)
    if args.images <= 0 or args.embed_images <= 0:
        raise RecipeError("--images and --embed-images must be positive")
    return args


def cam_layer(model: MultiExitResNet, exit_index: int, where: str = "own") -> str:
    """Name of the module whose output is exit ``exit_index``'s CAM map (see the module docstring)."""
    if where == "shared":
        return model.exit_points[0] if model.exit_points else "layer4"
    if exit_index == len(model.exit_points):
        return "layer4"
    point = model.exit_points[exit_index]
    convs = [i for i, part in enumerate(model.subnetworks[point])
             if any(isinstance(m, torch.nn.Conv2d) for m in part.modules())]
    return f"subnetworks.{point}.{convs[-1]}" if convs else point


def encode(model: MultiExitResNet, recipe, split: str, images: int):
    """(pooled features per exit, projections per exit, labels) of ``images`` images of ``split``."""
    features, projections, labels = [], [], []
    batches = eval_batches(recipe, split, images)
    first = next(batches, None)  # a missing split fails here, before a progress bar is drawn
    with torch.no_grad(), tqdm(total=images, desc="encoding", unit="img", dynamic_ncols=True) as bar:
        for batch, batch_labels in itertools.chain([first] if first else [], batches):
            output = model(batch)
            features.append([f.float() for f in output.features])
            projections.append([z.float() for z in output.projections])
            labels.append(batch_labels)
            bar.update(len(batch_labels))
    if not labels:
        raise RecipeError(f"--split {split}: no readable images")
    return ([torch.cat(f) for f in zip(*features)], [torch.cat(z) for z in zip(*projections)],
            torch.cat(labels).long())


def one_of_each_class(labels: torch.Tensor, count: int) -> list[int]:
    """Positions of ``count`` images taking the classes in turn, so the rows show many classes."""
    queues = {c: (labels == c).nonzero().flatten().tolist() for c in labels.unique().tolist()}
    chosen = []
    while len(chosen) < min(count, len(labels)):
        for queue in queues.values():
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return sorted(chosen)


def images_at(recipe, split: str, subset: int, positions: list[int]) -> torch.Tensor:
    """The images at ``positions`` of the same seeded subset ``encode`` read (a second pass, so that
    the embedding images need not all stay in memory)."""
    wanted, found, seen = set(positions), {}, 0
    for batch, _ in eval_batches(recipe, split, subset):
        for i in range(len(batch)):
            if seen + i in wanted:
                found[seen + i] = batch[i]
        seen += len(batch)
        if len(found) == len(wanted):
            break
    return torch.stack([found[p] for p in positions])


def exit_scores(model: MultiExitResNet, target: str, labels: torch.Tensor, features, projections, all_labels):
    """``score(output, e) -> [N]``: the Grad-CAM score of exit ``e`` for the shown images (``labels``),
    class means from the embedding images (``features``/``projections`` per exit, ``all_labels``)."""
    classes = int(all_labels.max()) + 1
    counts = torch.bincount(all_labels, minlength=classes).clamp(min=1)[:, None]

    def class_means(x):
        return torch.zeros(classes, x.shape[1]).index_add_(0, all_labels, x) / counts

    if target == "logit":
        return lambda output, e: ([*output.sub_logits, output.logits][e]).gather(1, labels[:, None]).squeeze(1)
    if target == "projection":
        prototypes = [F.normalize(class_means(z), dim=1)[labels] for z in projections]
        return lambda output, e: (output.projections[e] * prototypes[e]).sum(1)
    directions = []  # unit class means less their average: a class of small features still gets its own
    for f in features:
        unit_means = F.normalize(class_means(f), dim=1)
        directions.append((unit_means - unit_means.mean(0))[labels])
    return lambda output, e: (output.features[e] * directions[e]).sum(1)


def grad_cams(model: MultiExitResNet, images: torch.Tensor, layers: list[str], score) -> torch.Tensor:
    """CAMs [exits, N, H, W] in [0, 1] at the input's size; ``score(output, e) -> [N]`` (exit_scores)."""
    from torchcam.methods import GradCAM

    cams = []
    for e, layer in enumerate(layers):
        with GradCAM(model, target_layer=layer) as extractor, torch.enable_grad():
            scores = score(model(images), e)
            cam = extractor(scores=scores, targets=lambda s: s)[0]
        cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
        cams.append((cam - low) / (high - low).clamp(min=1e-8))  # bilinear smooths the peak below 1
    return torch.stack(cams)


def knn_loo_top1(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out k-NN top-1 (%) within the set: each image voted on by its k nearest others."""
    f = F.normalize(features, dim=1)
    similarity = (f @ f.T).fill_diagonal_(-float("inf"))
    near, index = similarity.topk(min(KNN_K, len(f) - 1), dim=1)
    votes = torch.zeros(len(f), int(labels.max()) + 1).scatter_add_(1, labels[index], (near / KNN_TEMPERATURE).exp())
    return 100.0 * (votes.argmax(1) == labels).float().mean().item()


def embed_2d(features: torch.Tensor, method: str) -> np.ndarray:
    """2-D coordinates of the L2-normalised features (Euclidean there = cosine on the features)."""
    x = F.normalize(features, dim=1).numpy()
    if method == "umap":
        import umap

        return umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=0).fit_transform(x)
    from sklearn.manifold import TSNE

    return TSNE(perplexity=min(30.0, max(1.0, (len(x) - 1) / 3)), init="pca", random_state=0).fit_transform(x)


def silhouette(points: np.ndarray, labels: np.ndarray) -> Optional[float]:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(points, labels)) if 2 <= len(set(labels)) < len(labels) else None


def class_names(recipe, split: str, num_classes: int) -> list[str]:
    """ImageFolder's class names (its sorted folders), else ``class N`` (e.g. a .beton file)."""
    from torchvision.datasets.folder import find_classes

    root = getattr(recipe.data, split)
    names = find_classes(str(root))[0] if root is not None and Path(root).is_dir() else []
    return names if len(names) >= num_classes else [f"class {i}" for i in range(num_classes)]


def draw_gradcam(path: Path, images: torch.Tensor, cams: torch.Tensor, row_names: list[str], column_names: list[str],
                 mean, std, title: str) -> None:
    plt = pyplot()
    rows, cols = len(images), 1 + len(cams)
    fig, axes = plt.subplots(rows, cols, figsize=(CELL * cols, CELL * rows + HEADER), squeeze=False)
    pixels = (images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    for r in range(rows):
        picture = pixels[r].permute(1, 2, 0).numpy()
        for c, ax in enumerate(axes[r]):
            ax.imshow(picture, interpolation="nearest")
            if c and cams[c - 1, r].max() > 0:
                ax.imshow(cams[c - 1, r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            elif c:  # negative everywhere: a uniform overlay would read as "looks everywhere alike"
                ax.text(0.5, 0.5, "no positive\nevidence", transform=ax.transAxes, ha="center", va="center",
                        fontsize=7, color="white", backgroundcolor="black")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(column_names[c], fontsize=8)
        axes[r, 0].set_ylabel(row_names[r], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (CELL * rows + HEADER)))
    save_png(fig, path, DPI)


def draw_embedding(path: Path, points: list[np.ndarray], labels: np.ndarray, names: list[str], titles: list[str],
                   title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(PANEL * len(points) + LEGEND, PANEL + 0.5), squeeze=False)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo")
    for ax, xy, panel_title in zip(axes[0], points, titles):
        for c in np.unique(labels):
            at = labels == c
            ax.scatter(xy[at, 0], xy[at, 1], s=8, color=colours(c / max(1, len(names) - 1) if len(names) > 20 else c),
                       label=names[c])
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(panel_title, fontsize=9)
    if len(names) <= 20:
        axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, markerscale=1.5, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - LEGEND / (PANEL * len(points) + LEGEND), 1))
    save_png(fig, path, DPI)


def make_pictures(args: argparse.Namespace) -> int:
    if args.method == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            raise RecipeError("--method umap needs umap-learn: pip install umap-learn") from None
    recipe, method, model = load_trained(args.checkpoint, tuple(args.set))
    if args.target == "logit" and (model.classifier is None or (model.exit_points and model.exit_classifiers is None)):
        raise RecipeError(f"--target logit needs a classifier on every exit (ce, dsn, cds), {method.name} has none; "
                          "use --target class-mean")
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    out = args.out or run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    exits = exit_names(model.num_exits)

    features, projections, labels = encode(model, recipe, args.split, args.embed_images)
    names = class_names(recipe, args.split, int(labels.max()) + 1)
    shown = one_of_each_class(labels, args.images)
    images = images_at(recipe, args.split, args.embed_images, shown)
    layers = [cam_layer(model, e, args.layer) for e in range(model.num_exits)]
    score = exit_scores(model, args.target, labels[shown], features, projections, labels)
    cams = grad_cams(model, images, layers, score)
    draw_gradcam(out / "gradcam.png", images, cams, [names[labels[p]] for p in shown],
                 ["image", *(f"{e}\n{layer}" for e, layer in zip(exits, layers))], recipe.data.mean, recipe.data.std,
                 f"Grad-CAM of {method.name}, target: {args.target}")

    label_array = labels.numpy()
    shown_as = METHOD_NAMES[args.method]
    points = [embed_2d(f, args.method) for f in tqdm(features, desc=shown_as, unit="exit", dynamic_ncols=True)]
    separation = {e: {"knn5_loo_top1": knn_loo_top1(f, labels), "silhouette_2d": silhouette(xy, label_array)}
                  for e, f, xy in zip(exits, features, points)}
    majority = 100.0 * np.bincount(label_array).max() / len(label_array)
    rows = [(e, layer, f"{separation[e]['knn5_loo_top1']:.1f}",
             "–" if separation[e]["silhouette_2d"] is None else f"{separation[e]['silhouette_2d']:.3f}")
            for e, layer in zip(exits, layers)]
    draw_embedding(out / "embedding.png", points, label_array, names,
                   [f"{e}: k-NN LOO {knn}%, silhouette {sil}" for e, _, knn, sil in rows],
                   f"{shown_as} of pooled features, {method.name}, {len(label_array)} {args.split} images "
                   f"(majority class {majority:.1f}%)")

    write_json(out / "pictures.json", {
        "checkpoint": str(args.checkpoint), "method": method.name, "arch": recipe.model.arch, "split": args.split,
        "exits": exits,
        "gradcam": {"library": "torchcam", "target": args.target, "target_means": TARGETS[args.target],
                    "layer": args.layer, "layers": dict(zip(exits, layers)),
                    "maps_without_positive_evidence": {e: int((c.amax(dim=(1, 2)) <= 0).sum())
                                                       for e, c in zip(exits, cams)},
                    "images": [{"position": p, "label": int(labels[p]), "class": names[labels[p]]} for p in shown],
                    "positions_in": f"the seeded subset of {args.embed_images} {args.split} images, in file order"},
        "embedding": {"method": args.method, "images": len(label_array), "majority_class_top1": majority,
                      "knn": f"leave-one-out, k={KNN_K}, cosine, votes exp(sim/{KNN_TEMPERATURE})",
                      "separation": separation},
    })
    table = "\n".join(["| exit | CAM layer | k-NN LOO top-1 (%) | silhouette 2-D |", "|---|---|---|---|",
                       *("| " + " | ".join(row) + " |" for row in rows)])
    write_bytes(out / "pictures.md", (
        f"# Pictures of {args.checkpoint}\n\n{method.name}, {recipe.model.arch}; {len(label_array)} {args.split} "
        f"images, majority class {majority:.1f}%. Grad-CAM target: {TARGETS[args.target]}. k-NN: {KNN_K} nearest, "
        f"leave-one-out, on the pooled features; silhouette of the {shown_as} points.\n\n{table}\n\n"
        "![Grad-CAM](gradcam.png)\n\n![embedding](embedding.png)\n").encode())
    print(f"{table}\nwrote {out}/gradcam.png, embedding.png, pictures.json, pictures.md")
    return 0


def main(argv=None) -> int:
    return one_line_errors(PROG, lambda: make_pictures(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
