"""The fastest this machine can JPEG-decode and random-resized-crop an image: the ceiling that
``benchmarks/loader_throughput.py`` measures every loader backend against.

    python -m benchmarks.decode_ceiling --data /tmp/photos --workers 2 --image-size 224

Each candidate reads the same files with the same number of parallel workers (processes, or DALI's
threads) and does only decode + crop + resize to uint8 (the loaders' flip, colour jitter,
normalisation and batching come on top), one or two crops per image:

* ``pil``: PIL decodes the whole image, then crops and resizes (torchvision's RandomResizedCrop);
* ``pil_draft``: libjpeg-turbo's DCT-domain downscaling first (PIL's ``draft``): the JPEG is decoded
  at 1/2, 1/4 or 1/8 size, the largest reduction that keeps every crop at least the output size;
* ``decode_jpeg``: ``torchvision.io.decode_jpeg`` (libjpeg-turbo) at full size, crop and resize on
  the tensor;
* ``dali``: DALI's CPU pipeline: the fused ROI crop-decode for one view; one decode and a
  ``random_resized_crop`` per view for two.

The ceiling for V views is the fastest candidate at V views. Crop boxes are torchvision's
RandomResizedCrop parameters (scale ``CROP_SCALE``, ratio 3/4–4/3).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence


from fasttrain.files import write_json  # noqa: E402

CANDIDATES = ("pil", "pil_draft", "decode_jpeg", "dali")
CROP_SCALE = (0.2, 1.0)  # as loader_throughput: the contrastive crops of the ImageNet recipes
CROP_RATIO = (3 / 4, 4 / 3)


def crop_boxes(width: int, height: int, views: int, rng) -> list[tuple[int, int, int, int]]:
    """``views`` RandomResizedCrop boxes (top, left, height, width), torchvision's sampling."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    shape_only = torch.empty(1, 1, 1).expand(3, height, width)  # get_params reads only the size
    torch.manual_seed(int(rng.integers(2 ** 31)))
    return [RandomResizedCrop.get_params(shape_only, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(views)]


def draft_request(width: int, height: int, boxes, size: int) -> tuple[int, int]:
    """The size to ask PIL's ``draft`` for: its reduction keeps the image at least this large, so
    every crop stays at least ``size`` pixels on each side."""
    smallest_h, smallest_w = min(b[2] for b in boxes), min(b[3] for b in boxes)
    return math.ceil(width * size / smallest_w), math.ceil(height * size / smallest_h)


def decode_and_crop(path: str, method: str, size: int, views: int, rng) -> list:
    """The ``views`` crops of one image as uint8 arrays [size, size, 3] (PIL) or tensors [3, size, size]."""
    if method == "decode_jpeg":
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        from torchvision.transforms.v2.functional import resized_crop

        image = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        boxes = crop_boxes(image.shape[2], image.shape[1], views, rng)
        return [resized_crop(image, *box, [size, size], antialias=True) for box in boxes]
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        boxes = crop_boxes(width, height, views, rng)
        if method == "pil_draft":
            image.draft("RGB", draft_request(width, height, boxes, size))
        image = image.convert("RGB")
        sx, sy = width / image.size[0], height / image.size[1]
        return [np.asarray(image.resize((size, size), Image.BILINEAR,
                                        box=(left / sx, top / sy, (left + w) / sx, (top + h) / sy)))
                for top, left, h, w in boxes]


def _decode_files(job) -> int:
    paths, method, size, views, seed = job
    import numpy as np
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    for path in paths:
        decode_and_crop(path, method, size, views, rng)
    return len(paths)


def _ready(_):
    """Imports paid before the clock starts."""
    import importlib

    for module in ("PIL.Image", "torchvision.io", "torchvision.transforms.v2.functional"):
        importlib.import_module(module)
    return True


def measure_python(paths: Sequence[str], method: str, size: int, views: int, workers: int) -> float:
    """Images per second of ``method`` over ``paths`` split across ``workers`` processes (0: this one)."""
    chunks = [list(paths[i::max(1, workers)]) for i in range(max(1, workers))]
    jobs = [(chunk, method, size, views, seed) for seed, chunk in enumerate(chunks)]
    _decode_files((paths[:2], method, size, views, 0))  # a first decode outside the clock
    if workers == 0:
        start = time.perf_counter()
        done = _decode_files(jobs[0])
        return done / (time.perf_counter() - start)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_ready, range(workers))
        start = time.perf_counter()
        done = sum(pool.map(_decode_files, jobs))
        return done / (time.perf_counter() - start)


def measure_dali(paths: Sequence[str], size: int, views: int, workers: int, batch_size: int) -> float:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=None, seed=0)
    def pipeline():
        encoded, _ = fn.readers.file(files=list(paths), random_shuffle=False, name="reader")
        if views == 1:
            image = fn.decoders.image_random_crop(encoded, device="cpu", output_type=types.RGB,
                                                  random_area=list(CROP_SCALE), random_aspect_ratio=list(CROP_RATIO))
            return fn.resize(image, resize_x=size, resize_y=size)
        image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        return tuple(fn.random_resized_crop(image, size=[size, size], random_area=list(CROP_SCALE),
                                            random_aspect_ratio=list(CROP_RATIO)) for _ in range(views))

    pipe = pipeline()
    pipe.build()
    pipe.run()  # thread start-up and first allocations outside the clock
    batches = max(1, len(paths) // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * batch_size / (time.perf_counter() - start)


def measure(paths: Sequence[str], size: int, views_list: Sequence[int], workers: int, batch_size: int,
            candidates: Sequence[str] = CANDIDATES) -> dict:
    """``{"candidates": {name: {views: images/s or None}}, "unavailable": {name: reason},
    "ceiling": {views: {"method", "images_per_second"}}}``."""
    rates, unavailable = {}, {}
    for name in candidates:
        try:
            rates[name] = {v: (measure_dali(paths, size, v, workers, batch_size) if name == "dali"
                               else measure_python(paths, name, size, v, workers)) for v in views_list}
        except ImportError as exc:
            unavailable[name] = str(exc).splitlines()[0]
    ceiling = {}
    for v in views_list:
        best = max((r[v], name) for name, r in rates.items())
        ceiling[v] = {"method": best[1], "images_per_second": best[0]}
    return {"candidates": rates, "unavailable": unavailable, "ceiling": ceiling}


def image_paths(data: Path, count: int) -> list[str]:
    """``count`` image files of an ImageFolder, in a fixed order, repeated if it has fewer."""
    files = sorted(str(p) for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"decode_ceiling: no JPEG files under {data}")
    return (files * math.ceil(count / len(files)))[:count]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--views", default="1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=640, help="images decoded per candidate and view count")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help="write the JSON here (default: print it)")
    args = p.parse_args(argv)
    views = [int(v) for v in args.views.split(",")]
    result = measure(image_paths(args.data, args.images), args.image_size, views, args.workers, args.batch_size,
                     [c for c in args.candidates.split(",") if c])
    if args.result:
        write_json(args.result, result)
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
