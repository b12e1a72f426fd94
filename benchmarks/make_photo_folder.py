"""An ImageNet-like ImageFolder of real photographs, cut from Debian's wallpaper packages.

    python -m benchmarks.make_photo_folder /tmp/photos --classes 5 --per-class 200

Loader benchmarks need real JPEGs (decode cost depends on real image statistics, which random
noise does not have). Sources: the wallpapers of lomiri-wallpapers-16.04, mate-backgrounds and
plasma-workspace-wallpapers (/usr/share/backgrounds, /usr/share/wallpapers).

Which wallpapers count as photographs (measured on the image shrunk to at most 512 px):
  * a JPEG file (the PNG and SVG wallpapers of these packages are drawings);
  * at least --size in both sides (no tiny images);
  * luminance entropy >= 6.0 bits (flat or few-colour images fall below);
  * detail >= 0.04: the fraction of pixels whose grey level differs by more than 2 from the
    mean of their 3x3 neighbourhood (smooth gradients and renders fall below; photographs carry
    texture and sensor noise).
A Plasma wallpaper ships one picture at several resolutions: only the largest file of its
``contents/images`` is a candidate. Near-duplicates across packages (same 8x8 average hash,
within 6 bits) are dropped. A few digital paintings with photographic texture pass the rule.

Every class gets --sources-per-class accepted wallpapers (in a --seed order) and its tiles are
random crops of them (the tile's aspect ratio, 10-100 % of the largest such box), resized to
--size and saved at JPEG --quality. With --val-per-class > 0 the folder has ``train/`` and
``val/`` (different crops of the same wallpapers); otherwise the class folders are at the top.
``sources.json`` at the top lists the wallpapers of each class and the rejected ones with why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fasttrain.errors import UserError
from fasttrain.faults import one_line_errors

PACKAGES = ("lomiri-wallpapers-16.04", "mate-backgrounds", "plasma-workspace-wallpapers")
ROOTS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
MIN_ENTROPY = 6.0  # bits of the 256-level luminance histogram
MIN_DETAIL = 0.04  # fraction of pixels off their 3x3 mean by more than 2 grey levels
DUPLICATE_BITS = 6  # average-hash Hamming distance that counts as the same picture
EXTENSIONS = (".jpg", ".jpeg", ".png", ".svg", ".svgz")


def candidates(roots=None) -> list[Path]:
    """Every wallpaper file, one per Plasma wallpaper (its largest), symbolic links and screenshots left out."""
    found = []
    for root in ROOTS if roots is None else roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.suffix.lower() not in EXTENSIONS:
                continue
            if path.stem.startswith("screenshot") or path.parent.name == "images_dark":
                continue  # a preview, or the same wallpaper's dark variant
            if path.parent.parent.name == "contents" and path != _largest(path.parent):
                continue  # the same Plasma wallpaper at a smaller resolution
            found.append(path)
    return found


def source_name(path) -> str:
    """A wallpaper's name: its file stem, or a Plasma wallpaper's folder (its files are named WxH)."""
    parts = Path(path).parts
    return parts[parts.index("contents") - 1] if "contents" in parts[:-1] else Path(path).stem


def _largest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_file() and not p.is_symlink()),
               key=lambda p: (p.stat().st_size, p.name))


def judge(path: Path, min_size: tuple[int, int]) -> tuple[dict, str | None]:
    """(measurements, why it is rejected or None)."""
    info: dict = {"path": str(path)}
    if path.suffix.lower() in (".svg", ".svgz"):
        return info, "vector drawing (SVG)"
    try:
        with Image.open(path) as image:
            info.update(format=image.format, width=image.width, height=image.height)
            if image.format != "JPEG":
                return info, f"{image.format}, not a JPEG photograph"
            if min(image.size) < min(min_size) or max(image.size) < max(min_size):
                return info, f"too small ({image.width}x{image.height})"
            image.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale, fast
            small = image.convert("RGB")
    except Exception as exc:  # PIL raises many types for a broken file
        return info, f"unreadable ({type(exc).__name__}: {exc})"
    small.thumbnail((512, 512))
    grey = small.convert("L")
    g = np.asarray(grey, dtype=np.int16)
    hist = np.bincount(g.ravel(), minlength=256) / g.size
    entropy = float(-(hist[hist > 0] * np.log2(hist[hist > 0])).sum())
    blurred = np.asarray(grey.filter(ImageFilter.BoxBlur(1)), dtype=np.int16)
    detail = float((np.abs(g - blurred) > 2).mean())
    info.update(entropy_bits=round(entropy, 3), detail=round(detail, 4), ahash=_ahash(grey))
    if entropy < MIN_ENTROPY:
        return info, f"flat: luminance entropy {entropy:.2f} < {MIN_ENTROPY} bits"
    if detail < MIN_DETAIL:
        return info, f"smooth: detail {detail:.3f} < {MIN_DETAIL}"
    return info, None


def _ahash(grey: Image.Image) -> int:
    pixels = np.asarray(grey.resize((8, 8), Image.BILINEAR), dtype=np.float32)
    bits = (pixels > pixels.mean()).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def tile_boxes(width: int, height: int, size: tuple[int, int], count: int, rng) -> list[tuple[int, int, int, int]]:
    """``count`` random crop boxes with the aspect ratio of ``size``, 10-100 % of the largest such box."""
    aspect = size[0] / size[1]
    max_w = min(width, height * aspect)
    boxes = []
    for _ in range(count):
        w = max_w * math.sqrt(rng.uniform(0.1, 1.0))
        w = max(w, min(max_w, size[0]))  # no upscaling where the wallpaper allows it
        h = w / aspect
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append((int(x), int(y), int(x + w), int(y + h)))
    return boxes


def build(out: Path, *, classes: int, per_class: int, val_per_class: int, size: tuple[int, int],
          quality: int, sources_per_class: int, seed: int, log=print) -> dict:
    """Builds the folder in a temporary sibling and renames it to ``out``; returns the manifest."""
    pool = candidates()
    if not pool:
        raise ValueError(f"no wallpapers under {' or '.join(map(str, ROOTS))}: apt-get install {' '.join(PACKAGES)}")
    rng = np.random.default_rng(seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    needed = classes * sources_per_class
    accepted, rejected, hashes = [], [], []
    for path in order:  # judged lazily, in the seeded order, until enough are accepted
        if len(accepted) == needed:
            break
        info, why = judge(path, size)
        if why is None:
            near = [str(p) for p, h in hashes if bin(h ^ info["ahash"]).count("1") <= DUPLICATE_BITS]
            why = f"near-duplicate of {near[0]}" if near else None
        if why:
            rejected.append({**info, "rejected": why})
        else:
            accepted.append(info)
            hashes.append((path, info["ahash"]))
    if len(accepted) < needed:
        raise ValueError(f"only {len(accepted)} photographic wallpapers found, {needed} needed "
                         f"(--classes {classes} x --sources-per-class {sources_per_class}): lower one of them")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits = {"train": per_class, "val": val_per_class} if val_per_class else {"": per_class}
    manifest = {"seed": seed, "size": list(size), "quality": quality, "rule": {
        "format": "JPEG", "min_entropy_bits": MIN_ENTROPY, "min_detail": MIN_DETAIL,
        "duplicate_ahash_bits": DUPLICATE_BITS}, "classes": {}, "rejected": rejected}
    try:
        for c in range(classes):
            name = f"class_{c:02d}"
            sources = accepted[c * sources_per_class:(c + 1) * sources_per_class]
            manifest["classes"][name] = [s["path"] for s in sources]
            for s_index, source in enumerate(sources):
                with Image.open(source["path"]) as image:
                    image = image.convert("RGB")
                    for split, count in splits.items():
                        # tiles of this class and split, dealt to its sources in turn
                        mine = range(s_index, count, len(sources))
                        if not len(mine):
                            continue
                        tile_rng = np.random.default_rng([seed, c, s_index, 0 if split != "val" else 1])
                        folder = tmp / split / name
                        folder.mkdir(parents=True, exist_ok=True)
                        for i, box in zip(mine, tile_boxes(image.width, image.height, size, len(mine), tile_rng)):
                            tile = image.resize(size, Image.BICUBIC, box=box, reducing_gap=3.0)
                            tile.save(folder / f"{source_name(source['path'])}_{i:04d}.jpg", quality=quality)
            log(f"[make_photo_folder] {name}: {per_class} train"
                f"{f' + {val_per_class} val' if val_per_class else ''} tiles from "
                f"{', '.join(source_name(s['path']) for s in sources)}")
        (tmp / "sources.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 500x375") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sides must be positive")
    return w, h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to create")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--per-class", type=int, default=200, help="training tiles per class")
    p.add_argument("--val-per-class", type=int, default=0, help="> 0: also a val/ split (then train/ + val/)")
    p.add_argument("--size", type=_size, default=(500, 375), help="tile size WIDTHxHEIGHT (ImageNet's typical)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--sources-per-class", type=int, default=3, help="wallpapers per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    for key in ("classes", "per_class", "sources_per_class"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.val_per_class < 0 or not 1 <= args.quality <= 100:
        p.error("--val-per-class must be >= 0 and --quality within 1..100")
    return one_line_errors("make_photo_folder", lambda: _make(args))


def _make(args) -> int:
    if not candidates():
        raise UserError(f"no wallpapers under {' or '.join(map(str, ROOTS))}: apt-get install {' '.join(PACKAGES)}")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise UserError(f"{args.out} exists and is not empty (pass --force to replace it)")
    try:
        manifest = build(args.out, classes=args.classes, per_class=args.per_class, val_per_class=args.val_per_class,
                         size=args.size, quality=args.quality, sources_per_class=args.sources_per_class,
                         seed=args.seed)
    except ValueError as exc:  # too few usable wallpapers for the classes asked
        raise UserError(str(exc)) from None
    total = args.classes * (args.per_class + args.val_per_class)
    print(f"[make_photo_folder] wrote {total} JPEGs in {args.classes} classes to {args.out} "
          f"({len(manifest['rejected'])} wallpapers rejected, see sources.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
