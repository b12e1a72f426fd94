"""ImageFolder -> FFCV .beton, with ffcv-imagenet's writer knobs.

    python -m loaders.ffcv_convert SRC_DIR OUT.beton [--max-resolution 512] [--compress-probability 0.5]
        [--jpeg-quality 90] [--write-mode proportion|jpg|raw] [--num-workers N] [--subset K] [--verify]

Fields: ``image`` (RGBImageField) and ``label`` (IntField, torchvision ImageFolder's class_to_idx, so
every backend agrees on labels; ``--classes-from TRAIN_DIR`` numbers them by the training split's
class folders). Beside ``OUT.beton``, ``OUT.classes.json`` lists the class names the labels index:
the loader refuses a validation .beton whose classes differ from the training split's. Unreadable
images are found before writing (every file is decoded, JPEGs at 1/8 scale, which still reads the
whole entropy-coded stream), skipped and named in one warning. The file is written under
``.OUT.tmp-<pid>`` and renamed at the end (after ``--verify``), so an interrupted (Ctrl-C, SIGTERM)
or failed conversion never leaves a file under the final name, and removes its temp file and shared
memory; temp files of killed conversions are swept on the next start.
``--subset K`` keeps the first K files in ImageFolder order (as ffcv-imagenet does), before unreadable
ones are dropped.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Process, Queue, SimpleQueue, Value
from pathlib import Path
from queue import Empty
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fasttrain.errors import UserError
from fasttrain.faults import one_line_errors, stop_on_signals
from fasttrain.files import replacing, sweep_stale_temps, write_json
from loaders.spec import load_rgb

_TORCH_THREADS = torch.get_num_threads()
import ffcv  # noqa: E402,F401  (importing it sets torch's thread count to 1: restored here)

torch.set_num_threads(_TORCH_THREADS)

log = logging.getLogger(__name__)
WRITE_MODES = ("proportion", "jpg", "raw")


class ConvertInputError(UserError, ValueError):
    """Unusable input (source folder, output path, option): the CLI prints it and exits 2."""


class _ImageDataset:
    """(HxWx3 uint8 array, label) per index; lives in the writer's worker processes (fork)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return np.asarray(load_rgb(path)), label


def _unreadable(path: str) -> Optional[str]:
    """None if the image decodes, else the reason."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # JPEG only
            image.load()
        return None
    except Exception as exc:  # PIL raises many types for a broken file
        return f"{type(exc).__name__}: {exc}"


def _report_errors(errors, work_fn, *args) -> None:
    """A writer worker that hands its error to the parent as one line (a full disk, a bad file),
    instead of printing a traceback per worker."""
    try:
        work_fn(*args)
    except Exception as exc:
        errors.put(f"{type(exc).__name__}: {exc}")
        os._exit(1)


def _make_writer(fname: str, fields, page_size: int, num_workers: int):
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class Writer(DatasetWriter):
        """ffcv's writer, but a worker that dies is an error, not an endless wait.

        ffcv 1.0.2's ``_write_common`` polls a done-counter until it reaches the total, so a worker
        that raises makes it spin for ever, and its shared memory is never unlinked.
        """

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            work, allocations, done = Queue(), Queue(), Value(ctypes.c_uint64, 0)
            for todo in queue_content:
                work.put(todo)
            for _ in range(self.num_workers):
                work.put(None)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                    allocations, *extra_worker_args)
            errors = SimpleQueue()  # a put is written before the worker exits
            procs = [Process(target=_report_errors, args=(errors, work_fn, *args), daemon=True)
                     for _ in range(self.num_workers)]

            def check_workers():
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    reason = f"exit code {failed[0]}" if errors.empty() else errors.get()
                    raise RuntimeError(f"a writer worker failed: {reason}")

            try:
                for p in procs:
                    p.start()
                with tqdm(total=num_samples, desc="writing", unit="img", dynamic_ncols=True) as bar:
                    while bar.n < num_samples:
                        bar.update(done.value - bar.n)
                        check_workers()
                        time.sleep(0.05)
                table = []
                while len(table) < len(procs):
                    try:
                        table.append(allocations.get(timeout=0.5))
                    except Empty:
                        check_workers()
                for p in procs:
                    p.join()
                self.finalize([a for part in table for a in part])
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return Writer(fname, fields, page_size=page_size, num_workers=num_workers)


def _page_size(max_resolution: int) -> int:
    """ffcv's default 8 MiB, or the next power of two holding one raw image at max_resolution."""
    need = max_resolution * max_resolution * 3
    return max(1 << 23, 1 << math.ceil(math.log2(need + 1)))


def verify(path: str | os.PathLike, labels: list[int]) -> None:
    """Read the .beton's header and metadata back; raise RuntimeError if it does not match."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    if int(reader.num_samples) != len(labels):
        raise RuntimeError(f"{path}: {reader.num_samples} samples written, {len(labels)} expected")
    if reader.field_names[:2] != ["image", "label"]:
        raise RuntimeError(f"{path}: fields {reader.field_names}, expected ['image', 'label']")
    images, written = reader.metadata["f0"], reader.metadata["f1"]
    if not np.array_equal(written, np.asarray(labels, dtype=written.dtype)):
        bad = int(np.flatnonzero(written != np.asarray(labels))[0])
        raise RuntimeError(f"{path}: label of sample {bad} is {written[bad]}, expected {labels[bad]}")
    if len(images) and (images["width"].min() == 0 or images["height"].min() == 0 or images["mode"].max() > 1):
        raise RuntimeError(f"{path}: image metadata is corrupt (zero size or unknown mode)")


def convert(src, out, *, max_resolution: int = 512, compress_probability: float = 0.5,
            jpeg_quality: int = 90, write_mode: str = "proportion", num_workers: Optional[int] = None,
            subset: Optional[int] = None, verify_output: bool = False, chunksize: int = 100,
            classes_from=None) -> dict:
    """Write the ImageFolder ``src`` to the .beton ``out``; return a summary dict. ``classes_from``: the
    training split's folder, whose class folders number the labels of every split (default: ``src``'s)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise ConvertInputError(f"SRC_DIR: no such directory: {src}")
    if not out.parent.is_dir():
        raise ConvertInputError(f"OUT: directory does not exist: {out.parent}")
    if out.is_dir():
        raise ConvertInputError(f"OUT: is a directory: {out}")
    if write_mode not in WRITE_MODES:
        raise ConvertInputError(f"write_mode={write_mode!r}: choose from {', '.join(WRITE_MODES)}")
    if max_resolution <= 0 or not 0 <= compress_probability <= 1 or not 1 <= jpeg_quality <= 100:
        raise ConvertInputError(f"max_resolution={max_resolution} must be > 0, compress_probability="
                                f"{compress_probability} in [0, 1], jpeg_quality={jpeg_quality} in [1, 100]")
    from ffcv.fields import IntField, RGBImageField

    sweep_stale_temps(out.parent, out.name)

    start = time.perf_counter()  # after the imports (ffcv + numba take seconds)
    from loaders.spec import LoaderError, class_names, classes_file, image_folder
    try:
        classes = class_names(Path(classes_from).expanduser()) if classes_from else None
        folder = image_folder(src, "SRC_DIR", classes)
    except (LoaderError, OSError) as exc:
        raise ConvertInputError(str(exc)) from exc
    samples = folder.samples[:subset] if subset and subset > 0 else folder.samples
    workers = max(1, num_workers or os.cpu_count() or 1)

    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        reasons = list(tqdm(pool.map(_unreadable, [p for p, _ in samples]),
                            total=len(samples), desc="checking", unit="img", dynamic_ncols=True))
    skipped = [f"{p} ({why})" for (p, _), why in zip(samples, reasons) if why]
    good = [s for s, why in zip(samples, reasons) if not why]
    if skipped:
        log.warning("skipping %d unreadable image(s): %s", len(skipped), "; ".join(skipped))
    if not good:
        raise ConvertInputError(f"SRC_DIR: no readable image in {src}")

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     compress_probability=compress_probability, jpeg_quality=jpeg_quality),
              "label": IntField()}
    with replacing(out) as tmp:
        writer = _make_writer(str(tmp), fields, _page_size(max_resolution), workers)
        chunk = max(1, min(chunksize, math.ceil(len(good) / (4 * workers))))
        writer.from_indexed_dataset(_ImageDataset(good), chunksize=chunk)
        if verify_output:
            verify(tmp, [label for _, label in good])
    write_json(classes_file(out), list(folder.classes))  # what the labels index: loaders check the splits agree
    seconds = time.perf_counter() - start
    return {"out": str(out), "images": len(good), "classes": len(folder.classes), "skipped": skipped,
            "bytes": out.stat().st_size, "seconds": seconds, "images_per_s": len(good) / seconds,
            "write_mode": write_mode, "max_resolution": max_resolution, "verified": verify_output}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loaders.ffcv_convert", description=__doc__.split("\n")[0])
    p.add_argument("src", metavar="SRC_DIR", help="ImageFolder directory (one folder per class)")
    p.add_argument("out", metavar="OUT.beton")
    p.add_argument("--max-resolution", type=int, default=512, help="longest side after resizing (default 512)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="JPEG share in proportion mode")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", choices=WRITE_MODES, default="proportion")
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--subset", type=int, default=None, help="only the first K images")
    p.add_argument("--verify", action="store_true", help="read the file back and check count and labels")
    p.add_argument("--classes-from", metavar="TRAIN_DIR", default=None,
                   help="number the labels by this folder's classes (the training split's: give it when converting "
                        "val/, so that a class missing there cannot shift the labels of the others)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stop_on_signals()
    return one_line_errors("convert", lambda: _convert(a), kept=f"; nothing written to {a.out}")


def _convert(a) -> int:
    try:
        s = convert(a.src, a.out, max_resolution=a.max_resolution, compress_probability=a.compress_probability,
                    jpeg_quality=a.jpeg_quality, write_mode=a.write_mode, num_workers=a.num_workers,
                    subset=a.subset, verify_output=a.verify, classes_from=a.classes_from)
    except RuntimeError as exc:  # a worker died, --verify failed
        print(f"convert: error: conversion failed, nothing written to {a.out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {s['out']}: {s['images']} images, {s['classes']} classes, {len(s['skipped'])} skipped, "
          f"{s['bytes'] / 2**20:.1f} MiB, {s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s"
          + (", verified" if s["verified"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
