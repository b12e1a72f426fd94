"""The floor of the trainer's overhead: a bare PyTorch loop of the same model, batch and precision.

    python -m benchmarks.bare_loop --arch resnet50 --batch-size 128 --precision bf16 --channels-last [--compile]

torchvision's ResNet, cross-entropy, SGD (momentum, weight decay), autocast, synthetic images made
once on the device: what anyone would write in twenty lines, with no Accelerate, no method, no logs.
``images/s`` here against the trainer's ``ce`` on the same synthetic input (``train_throughput
--backends synthetic --method ce``) is the trainer's overhead as a ratio. Timed like step_cost: warm-up
steps, then CUDA events (GPU) or perf_counter around completed steps (CPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from benchmarks.common import summarize, training_device  # noqa: E402
from fasttrain.files import write_json  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def measure(args) -> dict:
    import torch
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = training_device()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = torchvision.models.get_model(args.arch, num_classes=args.num_classes).to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = getattr(torch, DTYPES[args.precision]) if DTYPES[args.precision] else None
    forward = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen,
                         device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1000 for start, end in events]
    else:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    stats = summarize(times)
    return {"arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
            "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
            "device": str(device), "warmup_steps": args.warmup, "timed_steps": args.steps,
            "warmup_seconds": time.perf_counter() - started - sum(times),
            "step_time_median_s": stats["median"], "step_time_iqr_s": stats["iqr"],
            "images_per_second": args.batch_size / stats["median"], "step_times_s": times}


def main(argv=None) -> int:
    args = parse_args(argv)
    row = measure(args)
    if args.out:
        write_json(args.out, row)
    print(f"[bare_loop] {args.arch}, batch {args.batch_size}, {args.precision}"
          f"{', compiled' if args.compile else ''} on {row['device']}: {row['images_per_second']:.1f} images/s "
          f"({row['step_time_median_s'] * 1000:.1f} ms/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
