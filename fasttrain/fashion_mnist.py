"""Turns Debian's `dataset-fashion-mnist` package (real 28x28 grey product photos, 10 classes)
into an ImageFolder of JPEG files, so the demo exercises the real JPEG path with no download.

    python -m fasttrain.fashion_mnist data/fashion_mnist [--train-per-class 600] [--val-per-class 200]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
SPLITS = {"train": "train", "val": "t10k"}
DONE = "fashion_mnist.json"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(picks))


def build(out: Path, source: Path = SOURCE, train_per_class: int | None = None, val_per_class: int | None = None,
          seed: int = 0, quality: int = 95) -> dict:
    out = Path(out)
    wanted = {"train_per_class": train_per_class, "val_per_class": val_per_class, "seed": seed}
    marker = out / DONE
    if marker.is_file() and json.loads(marker.read_text()).get("options") == wanted:
        return json.loads(marker.read_text())
    files = {split: (source / f"{stem}-images-idx3-ubyte.gz", source / f"{stem}-labels-idx1-ubyte.gz")
             for split, stem in SPLITS.items()}
    for images, labels in files.values():
        for path in (images, labels):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; install it with: apt-get install dataset-fashion-mnist")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        for split, (image_file, label_file) in files.items():
            images, labels = read_idx(image_file), read_idx(label_file)
            keep = balanced_subset(labels, train_per_class if split == "train" else val_per_class, seed)
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i in tqdm(keep, desc=f"fashion-mnist {split}", unit="img"):
                Image.fromarray(images[i], mode="L").save(tmp / split / CLASSES[labels[i]] / f"{i:05d}.jpg",
                                                           quality=quality)
            counts[split] = int(len(keep))
        summary = {"options": wanted, "images": counts, "classes": list(CLASSES)}
        (tmp / DONE).write_text(json.dumps(summary, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output directory (gets train/ and val/)")
    parser.add_argument("--train-per-class", type=int, default=None, help="images per class (default: all 6000)")
    parser.add_argument("--val-per-class", type=int, default=None, help="images per class (default: all 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args(argv)
    try:
        summary = build(args.out, args.source, args.train_per_class, args.val_per_class, args.seed)
    except FileNotFoundError as exc:
        print(f"fashion_mnist: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary['images']['train']} train / {summary['images']['val']} val JPEGs, "
          f"{len(summary['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
