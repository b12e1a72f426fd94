"""Images per second of each loader backend on the same images, single- and two-view.

    python -m benchmarks.loader_throughput --data /tmp/photos --backends torchvision,dali,ffcv --workers 2

Every (backend, views) pair runs in its own fresh process: the loader is built for the training
split with the contrastive augmentation (SupCon's crop, flip, colour jitter, grayscale) at
--image-size, then --warmup batches (worker start-up, first decodes) are drawn and left out, and
the next --batches batches are timed (the epoch restarts when it runs out). Batches land on the
training device (GPU when there is one, where the clock stops only after a synchronize).
images/s counts images, not crops: a two-view batch of B images holds 2B crops (torchvision
decodes an image once and crops it twice; DALI as ``--dali-decode`` says; FFCV once for every view).

Every backend is also reported as a fraction of the **ceiling**: the fastest decode + random-resized-
crop of the same files with the same number of workers (``benchmarks/decode_ceiling.py``: PIL, PIL
with DCT-domain downscaling, torchvision's decode_jpeg, DALI's fused crop-decode), measured in its own
process before and after the backends, the faster of the two runs counting (``--no-ceiling`` leaves
it out).

FFCV reads a .beton: --data is converted first with ``loaders.ffcv_convert.convert`` into
--beton-dir (kept, and reused by train_throughput, while newer than the folder). A backend that
cannot run here (not installed, LoaderError, a crash) is recorded as unavailable with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional


from benchmarks.common import (add_loader_options, backend_source, bar_chart, markdown_table, run_worker,  # noqa: E402
                               summarize, training_device, worker_row, write_json, write_report)

BACKENDS = ("torchvision", "dali", "ffcv")
CROP_SCALE = (0.2, 1.0)  # the contrastive crops of recipes/_imagenet.yaml (official SupCon/SelfCon)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an ImageFolder directory (class folders of images)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--views", default="1,2", help="views per image to measure, e.g. 1,2")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers (processes or threads of the backend)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=20, help="timed batches")
    p.add_argument("--warmup", type=int, default=1, help="batches drawn before timing")
    p.add_argument("--dali-decode", choices=("once", "per_view"), default="once",
                   help="data.dali.decode: two views from one decode, or one fused crop-decode per view")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per measurement")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                   help="skip the decode + crop ceiling (benchmarks/decode_ceiling.py)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/loaders"))
    add_loader_options(p)
    p.add_argument("--num-views", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        args.views = [int(v) for v in args.views.split(",") if v.strip()]
    except ValueError:
        p.error(f"--views {args.views!r}: expected numbers like 1,2")
    if not set(args.views) <= {1, 2} or not args.views:
        p.error("--views: a loader makes 1 or 2 views")
    if args.batches < 1 or args.warmup < 0 or args.batch_size < 1 or args.workers < 0:
        p.error("--batches and --batch-size must be >= 1, --warmup and --workers >= 0")
    if not args.worker and not args.data.is_dir():
        p.error(f"--data: no such directory: {args.data}")
    return args


# ---------------------------------------------------------------- one measurement, in its own process


def measure(args) -> dict:
    import torch

    from loaders import DataConfig, LoaderError, LoaderRequest, build_loader

    device = training_device()
    row = {"backend": args.backend, "num_views": args.num_views, "batch_size": args.batch_size,
           "workers": args.workers, "image_size": args.image_size, "device": str(device),
           "dali_decode": args.dali_decode if args.backend == "dali" else None}
    cfg = DataConfig(train=args.source, image_size=args.image_size, num_workers=args.workers, augment="contrastive",
                     crop_scale=CROP_SCALE, dali={"decode": args.dali_decode}, colour_stage=args.colour_stage,
                     decode=args.decode if args.backend == "torchvision" else "host")
    req = LoaderRequest(split="train", batch_size=args.batch_size, augment="contrastive", num_views=args.num_views,
                        device=device, seed=0)
    start = time.perf_counter()
    try:
        loader = build_loader(args.backend, cfg, req)
    except (LoaderError, ImportError) as exc:
        return {**row, "available": False, "reason": str(exc).splitlines()[0]}
    build_seconds = time.perf_counter() - start

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            drawn = 0
            for batch in loader:
                drawn += 1
                yield batch
            if not drawn:
                raise RuntimeError(f"{args.backend}: an epoch without a single batch")
            epoch += 1

    stream = batches()
    start = time.perf_counter()
    for _ in range(args.warmup):
        views, labels = next(stream)
    sync()
    warmup_seconds = time.perf_counter() - start
    times, images = [], 0
    cpu_before = host_cpu_seconds()
    began = last = time.perf_counter()
    for _ in range(args.batches):
        views, labels = next(stream)
        if len(views) != args.num_views or views[0].shape[-1] != args.image_size:
            raise RuntimeError(f"{args.backend}: got {len(views)} views of {tuple(views[0].shape)}")
        sync()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        images += labels.shape[0]
    elapsed = last - began
    cpu_per_image = (host_cpu_seconds() - cpu_before) / images
    stats = summarize(times)
    row.update(split_stages(loader, stream, args, sync, views))
    return {**row, "available": True, "reason": None, "dataset_images": loader.num_samples,
            "images_per_second": images / elapsed, "crops_per_second": images * args.num_views / elapsed,
            "batch_time_median_s": stats["median"], "batch_time_iqr_s": stats["iqr"], "timed_batches": args.batches,
            "warmup_batches": args.warmup, "build_seconds": build_seconds, "warmup_seconds": warmup_seconds,
            "skipped_images": len(loader.skipped), "view_dtype": str(views[0].dtype),
            "view_shape": list(views[0].shape),
            # the host's CPU time (this process and its loader workers) per image, and what it implies
            "host_cpu_seconds_per_image": cpu_per_image, "host_cores_for_3000_images_per_second": cpu_per_image * 3000,
            "bytes_to_device_per_image": transfer_bytes(loader, args)}


def split_stages(loader, stream, args, sync, views) -> dict:
    """Where the colour runs on the device (``loader.stages``): the host stage alone (read, decode,
    crop, flip; uint8 handed over), timed over as many batches with the stages swapped for a plain
    conversion once the batches the workers made ahead while the device stage ran are drawn (the
    backend's prefetch depth: torchvision's 2 workers hold 8), and the device stage's own cost per
    image, timed on a batch of that shape."""
    stages = getattr(loader, "stages", None)
    if not stages or getattr(loader, "decoder", None) is not None:
        return {"host_stage_images_per_second": None, "device_stage_ms_per_image": None}
    import torch

    batch = torch.randint(0, 256, tuple(views[0].shape), dtype=torch.uint8, device=views[0].device)
    for stage in stages:  # warm-up
        stage(batch)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        for stage in stages:
            stage(batch)
    sync()
    device_ms = (time.perf_counter() - start) / (5 * batch.shape[0]) * 1e3
    from loaders import DataConfig, prefetch_batches

    # the uint8 crops as they arrive: no colour, and no conversion to float (the device's work on a GPU)
    loader.stages, dtype, loader.dtype = [lambda x: x for _ in stages], loader.dtype, torch.uint8
    try:
        for _ in range(1 + prefetch_batches(args.backend, DataConfig(num_workers=args.workers))):
            next(stream)
        sync()
        images, start = 0, time.perf_counter()
        for _ in range(args.batches):
            images += next(stream)[1].shape[0]
        sync()
        host_rate = images / (time.perf_counter() - start)
    finally:
        loader.stages, loader.dtype = stages, dtype
    return {"host_stage_images_per_second": host_rate, "device_stage_ms_per_image": device_ms}


def host_cpu_seconds() -> float:
    """CPU time (user + system) of this process and of every live process it started (loader workers):
    read from /proc, since RUSAGE_CHILDREN counts only children that have ended."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # fields after the name: state, ppid, ...; utime and stime are 14th and 15th overall
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def transfer_bytes(loader, args) -> Optional[int]:
    """Bytes per image that cross from the host to the device, where the backend says: the torchvision
    loader's uint8 crops (device stage) or float32 images; None where decoding already ran on the device
    (DALI mixed) or the backend does not say."""
    stages = getattr(loader, "stages", "unknown")
    if stages == "unknown":
        return None
    if getattr(loader, "decoder", None) is not None:  # the files themselves: their mean size, once per image
        files = [path for path, _ in loader.loader.dataset.folder.samples[:200]]
        return round(sum(os.path.getsize(f) for f in files) / len(files))
    per_view = 3 * args.image_size ** 2 * (1 if stages else 4)
    return per_view * args.num_views


def worker_args(args, backend: str, source: Path, views: int) -> list:
    return ["--data", args.data, "--backend", backend, "--source", source, "--num-views", views,
            "--workers", args.workers, "--batch-size", args.batch_size, "--image-size", args.image_size,
            "--batches", args.batches, "--warmup", args.warmup, "--dali-decode", args.dali_decode,
            "--colour-stage", args.colour_stage, "--decode", args.decode]


# ---------------------------------------------------------------- the report


def measure_ceiling(args) -> dict:
    ceiling = run_worker("benchmarks.decode_ceiling", [
        "--data", args.data, "--image-size", args.image_size, "--views", ",".join(map(str, args.views)),
        "--workers", args.workers, "--batch-size", args.batch_size,
        "--images", (args.warmup + args.batches) * args.batch_size], timeout=args.timeout)
    for v in args.views:
        rate = ceiling_rate(ceiling, v)
        print(f"[loaders] ceiling     {v} view(s): "
              + (f"{rate:8.1f} images/s ({ceiling['ceiling'][str(v)]['method']})"
                 if rate else f"unavailable ({ceiling.get('error')})"), flush=True)
    return ceiling


def fastest(before: dict, after: dict) -> dict:
    """The ceiling measured before and after the backends, each candidate at the faster of its two
    runs: a shared machine's speed drifts over minutes, and the fractions should not flatter a backend."""
    runs = [run for run in (before, after) if "candidates" in run]
    if not runs:
        return before
    candidates: dict = {}
    for run in runs:
        for name, rates in run["candidates"].items():
            mine = candidates.setdefault(name, {})
            for views, rate in rates.items():
                mine[views] = max(mine.get(views) or 0, rate or 0) or None
    ceiling = {}
    for views in {v for rates in candidates.values() for v in rates}:
        rate, name = max((rates.get(views) or 0, name) for name, rates in candidates.items())
        ceiling[views] = {"method": name, "images_per_second": rate}
    return {"candidates": candidates, "unavailable": runs[0]["unavailable"], "ceiling": ceiling,
            "runs": [before, after]}


def ceiling_rate(ceiling: dict, views: int):
    entry = (ceiling or {}).get("ceiling", {}).get(str(views))
    return entry["images_per_second"] if entry else None


def table(rows: list[dict], args, ceiling: dict) -> str:
    by = {(r["backend"], r["num_views"]): r for r in rows}
    header = ["Backend"]
    for v in args.views:
        header += [f"{v} view{'s' if v > 1 else ''}: images/s", f"{v}v: × torchvision", f"{v}v: / ceiling"]
    header += ["notes"]
    body = []
    if ceiling and "error" not in ceiling:
        line = ["ceiling"]
        for v in args.views:
            best = ceiling["ceiling"][str(v)]
            line += [f"{best['images_per_second']:.1f}", None, f"1.00 ({best['method']})"]
        others = "; ".join(f"{name} " + "/".join(f"{rate:.0f}" for rate in r.values())
                           for name, r in ceiling["candidates"].items())
        body.append(line + [f"decode + crop only; candidates ({'/'.join(map(str, args.views))} views): {others}"])
    for backend in args.backends:
        line, notes = [backend], []
        for v in args.views:
            r, ref = by.get((backend, v)), by.get(("torchvision", v))
            if r is None or not r.get("available"):
                line += ["unavailable", None]
                if r is not None and r.get("reason") and r["reason"] not in notes:
                    notes.append(r["reason"])
                continue
            line.append(f"{r['images_per_second']:.1f} (batch {r['batch_time_median_s']:.3f} s ± "
                        f"{r['batch_time_iqr_s']:.3f})")
            ok = ref is not None and ref.get("available")
            line.append(f"×{r['images_per_second'] / ref['images_per_second']:.2f}" if ok else None)
            line.append(f"{r['fraction_of_ceiling']:.2f}" if r.get("fraction_of_ceiling") else None)
        if any(r.get("conversion_seconds") for r in rows if r["backend"] == backend):
            notes.append(f"converted in {max(r.get('conversion_seconds') or 0 for r in rows):.0f} s (not timed)")
        body.append(line + ["; ".join(notes)[:160] or None])
    device = next((r["device"] for r in rows if r.get("device")), "?")
    title = (f"Loader throughput on {args.data} ({next((r['dataset_images'] for r in rows if r.get('available')), '?')}"
             f" images per epoch), contrastive augmentation, {args.image_size}px crops, batch {args.batch_size}, "
             f"{args.workers} workers, device {device}; {args.warmup} warm-up batch(es) left out, "
             f"{args.batches} timed. "
             f"images/s counts images (a 2-view batch holds two crops of each); "
             f"'batch' is the median (± IQR) time per batch.")
    return title + "\n\n" + markdown_table(header, body) + "\n\n" + host_table(rows) + "\n"


def host_table(rows: list[dict]) -> str:
    """What feeding costs the host: CPU time per image (the process and its workers), the cores that
    3,000 images/s (a ResNet-50 on one H100/H200) would need, and the bytes per image sent to the device."""
    def maybe(value, fmt):
        return "–" if value is None else fmt.format(value)

    body = [[r["backend"], r["num_views"], f"{r['host_cpu_seconds_per_image'] * 1000:.2f}",
             f"{r['host_cores_for_3000_images_per_second']:.1f}",
             maybe(r.get("bytes_to_device_per_image") and r["bytes_to_device_per_image"] / 1024, "{:.0f} KiB"),
             maybe(r.get("host_stage_images_per_second"), "{:.1f}"), maybe(r.get("host_stage_fraction_of_ceiling"),
                                                                          "{:.2f}"),
             maybe(r.get("device_stage_ms_per_image"), "{:.2f}")]
            for r in rows if r.get("available") and "host_cpu_seconds_per_image" in r]
    return markdown_table(["backend", "views", "host CPU ms / image", "host cores for 3,000 img/s",
                           "to the device / image", "host stage alone: images/s", "host stage / ceiling",
                           "device stage ms / image"], body)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        write_json(args.result, measure(args))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    before = measure_ceiling(args) if args.ceiling else None
    rows = []
    for backend in args.backends:
        source, conversion, reason = backend_source(backend, args.data, args.beton_dir)
        if reason:
            rows += [{"backend": backend, "num_views": v, "available": False, "reason": reason} for v in args.views]
            print(f"[loaders] {backend}: unavailable ({reason})", flush=True)
            continue
        for views in args.views:
            row = worker_row("benchmarks.loader_throughput", worker_args(args, backend, source, views),
                             timeout=args.timeout)
            row.update(backend=backend, num_views=views, conversion_seconds=conversion)
            rows.append(row)
            if row["available"]:
                print(f"[loaders] {backend:<11} {views} view(s): {row['images_per_second']:8.1f} images/s "
                      f"({row['crops_per_second']:.1f} crops/s)", flush=True)
            else:
                print(f"[loaders] {backend:<11} {views} view(s): unavailable ({row['reason']})", flush=True)
    ceiling = fastest(before, measure_ceiling(args)) if args.ceiling else None
    for row in rows:
        rate = ceiling_rate(ceiling, row["num_views"])
        if row["available"] and rate:
            row["fraction_of_ceiling"] = row["images_per_second"] / rate
            if row.get("host_stage_images_per_second"):
                row["host_stage_fraction_of_ceiling"] = row["host_stage_images_per_second"] / rate
    text = table(rows, args, ceiling)
    write_report(args.out, "loader_throughput", args, rows, text, worker_only=("backend", "source", "num_views"))
    if ceiling is not None:
        write_json(args.out / "decode_ceiling.json", ceiling)
    by = {(r["backend"], r["num_views"]): r for r in rows}
    for v in args.views:
        by[("ceiling", v)] = {"images_per_second": ceiling_rate(ceiling, v)}
    categories = (["ceiling"] if args.ceiling else []) + args.backends
    bar_chart(args.out / "loader_throughput.png", [{
        "title": "Loader throughput (images/s)", "ylabel": "images / s", "categories": categories, "fmt": "%.0f",
        "series": {f"{v} view{'s' if v > 1 else ''}": [by[(b, v)].get("images_per_second") for b in categories]
                   for v in args.views}}],
        title=f"{args.data.name}: batch {args.batch_size}, {args.image_size}px, {args.workers} workers, "
              f"{rows[0].get('device', '') if rows else ''}")
    print(text)
    print(f"[loaders] wrote {args.out}/loader_throughput.{{json,md,png}}")
    return 0 if any(r.get("available") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
