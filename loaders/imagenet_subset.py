"""A class subset of ImageNet as ImageFolders of symlinked class folders (no image is copied).

    python -m loaders.imagenet_subset IMAGENET_DIR OUT [--classes imagenet100 | --classes FILE]

``IMAGENET_DIR`` holds ``train/`` and ``val/`` with one folder per WordNet id (the layout every
loader here reads). ``imagenet100`` is the 100-class list of Tian, Krishnan and Isola (CMC, 2019),
used by the SelfCon paper's Table 2; ``FILE`` is any text file with one WordNet id per line.
``OUT/train/<wnid>`` and ``OUT/val/<wnid>`` link to the source folders; the tree is built under a
temp name and renamed, so an interrupted run leaves nothing half-made.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from fasttrain.errors import UserError
from fasttrain.faults import one_line_errors

IMAGENET100 = """
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split()
CLASS_LISTS = {"imagenet100": IMAGENET100}
SPLITS = ("train", "val")


class SubsetError(UserError, ValueError):
    """Unusable input: the CLI prints it in one line and exits 2."""


def read_classes(name_or_file: str) -> list[str]:
    if name_or_file in CLASS_LISTS:
        return CLASS_LISTS[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise SubsetError(f"--classes {name_or_file}: neither a known list ({', '.join(CLASS_LISTS)}) nor a file")
    classes = path.read_text().split()
    if not classes or len(set(classes)) != len(classes):
        raise SubsetError(f"--classes {path}: {'empty' if not classes else 'a class is listed twice'}")
    return classes


def build_subset(source: Path, out: Path, classes: list[str]) -> dict:
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser()
    for split in SPLITS:
        if not (source / split).is_dir():
            raise SubsetError(f"IMAGENET_DIR: no {split}/ folder in {source}")
        missing = [c for c in classes if not (source / split / c).is_dir()]
        if missing:
            raise SubsetError(f"IMAGENET_DIR: {len(missing)} class folder(s) missing in {source / split}, "
                              f"e.g. {missing[0]}")
    if out.exists():
        raise SubsetError(f"OUT: {out} exists; remove it or choose another name")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
            for wnid in classes:
                (tmp / split / wnid).symlink_to(source / split / wnid, target_is_directory=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "classes": len(classes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loaders.imagenet_subset", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="IMAGENET_DIR")
    parser.add_argument("out", metavar="OUT")
    parser.add_argument("--classes", default="imagenet100", help="imagenet100 (default) or a file of WordNet ids")
    args = parser.parse_args(argv)
    return one_line_errors("imagenet_subset", lambda: _build(args))


def _build(args) -> int:
    summary = build_subset(Path(args.source), Path(args.out), read_classes(args.classes))
    print(f"wrote {summary['out']}: train/ and val/ with {summary['classes']} linked class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
