"""Small real-image datasets as ImageFolders of JPEG files, made from what is on the disk (no download),
for the demo and the tests of learning:

* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (28x28 grey product photos, 10 classes,
  60,000 train / 10,000 test).
* ``digits``: scikit-learn's bundled handwritten digits (UCI optdigits, 8x8 scans with 17 grey
  levels, 10 classes, 1,797 images), upsampled to 28x28; split 3:1 per class into train / val.

    python -m fasttrain.demo_data fashion_mnist data/fashion_mnist [--train-per-class 1000] [--val-per-class 200]
    python -m fasttrain.demo_data digits data/digits
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

from fasttrain.errors import UserError
from fasttrain.faults import one_line_errors

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
DONE = "demo_data.json"


class SourceError(UserError):
    """The source data is not installed: one line saying what to install."""


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def fashion_mnist(source: Path = FASHION_MNIST) -> dict:
    """{split: (uint8 images [N, 28, 28], labels [N])} and the class names."""
    splits = {}
    for split, stem in (("train", "train"), ("val", "t10k")):
        images, labels = source / f"{stem}-images-idx3-ubyte.gz", source / f"{stem}-labels-idx1-ubyte.gz"
        for path in (images, labels):
            if not path.is_file():
                raise SourceError(f"{path}: missing; install it with: apt-get install dataset-fashion-mnist")
        splits[split] = (read_idx(images), read_idx(labels))
    return {"splits": splits, "classes": FASHION_CLASSES}


def digits(seed: int = 0) -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SourceError("scikit-learn is missing; install it with: pip install -e '.[dev]'") from None
    data = load_digits()
    images = np.stack([np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((28, 28),
                                                                                         Image.BILINEAR))
                       for img in data.images])
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        val[members[: len(members) // 4]] = True
    return {"splits": {"train": (images[~val], labels[~val]), "val": (images[val], labels[val])},
            "classes": tuple(f"digit_{c}" for c in range(10))}


SOURCES = {"fashion_mnist": fashion_mnist, "digits": digits}


def balanced_subset(labels: np.ndarray, num_classes: int, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def build(name: str, out: Path, train_per_class: int | None = None, val_per_class: int | None = None,
          seed: int = 0, quality: int = 95) -> dict:
    """Writes ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg`` (once: a marker file records the
    options; a folder made with other options is rebuilt). Written to a temp name, then renamed."""
    if name not in SOURCES:
        raise SourceError(f"{name!r}: unknown dataset, choose from {', '.join(SOURCES)}")
    out = Path(out)
    wanted = {"dataset": name, "train_per_class": train_per_class, "val_per_class": val_per_class, "seed": seed}
    marker = out / DONE
    if marker.is_file() and json.loads(marker.read_text()).get("options") == wanted:
        return json.loads(marker.read_text())
    source = SOURCES[name]()
    classes = source["classes"]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        for split, (images, labels) in source["splits"].items():
            keep = balanced_subset(labels, len(classes), train_per_class if split == "train" else val_per_class, seed)
            for class_name in classes:
                (tmp / split / class_name).mkdir(parents=True)
            for i in tqdm(keep, desc=f"{name} {split}", unit="img", leave=False):
                Image.fromarray(images[i], mode="L").save(tmp / split / classes[labels[i]] / f"{i:05d}.jpg",
                                                           quality=quality)
            counts[split] = int(len(keep))
        summary = {"options": wanted, "images": counts, "classes": list(classes)}
        (tmp / DONE).write_text(json.dumps(summary, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(SOURCES))
    parser.add_argument("out", type=Path, help="output directory (gets train/ and val/)")
    parser.add_argument("--train-per-class", type=int, default=None, help="images per class (default: all)")
    parser.add_argument("--val-per-class", type=int, default=None, help="images per class (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return one_line_errors("demo_data", lambda: _build(args))


def _build(args) -> int:
    summary = build(args.dataset, args.out, args.train_per_class, args.val_per_class, args.seed)
    print(f"{args.out}: {summary['images']['train']} train / {summary['images']['val']} val JPEGs, "
          f"{len(summary['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
