"""Can this machine run every path? A few training steps through the trainer's own step for each
installed loader backend x each precision the device supports x compile off/on, for `selfcon` and
`supcon`, plus a linear-evaluation step, on a tiny JPEG folder made here (or ``--data``).

    python -m fasttrain.selftest [--device auto|cpu|cuda] [--quick] [--data DIR] [--out selftest.json]
    accelerate launch --multi_gpu --num_processes 2 -m fasttrain.selftest      # adds the gather across processes

Each path is checked for: views as the loader contract says (count, dtype, channels_last, device),
a finite loss that falls over repeated steps on one fixed batch, a finite linear-evaluation step, the
peak memory, and, across backends, the same labels for the same validation files. On a GPU this
exercises DALI's `mixed` decoder, FFCV's ToDevice, fp16 with loss scaling, `max_memory_allocated`,
torch.compile on CUDA and NCCL gathers; without one they are reported as
skipped, with the reason. Exit status 1 if any path the device should run failed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


BACKENDS = ("torchvision", "dali", "ffcv")
METHODS = ("selfcon", "supcon")
GPU_ONLY = ("dali mixed (nvJPEG) decoding", "dali CPU decoding feeding the GPU (data.dali.device: cpu)",
            "ffcv ToDevice", "fp16 with loss scaling",
            "torch.cuda.max_memory_allocated", "torch.cuda.mem_get_info (whole-device memory)",
            "torch.compile on CUDA", "NCCL gather across processes")
STEPS, BATCH, SIZE = 8, 8, 32


@dataclass(frozen=True)
class Check:
    backend: str
    precision: str
    compile: bool
    method: str
    dali_device: str = "gpu"  # data.dali.device: on a GPU, "cpu" decodes on the CPU and DALI copies the batch

    @property
    def name(self) -> str:
        backend = self.backend + ("(cpu decode)" if self.dali_device == "cpu" else "")
        return f"{backend}/{self.precision}/{'compiled' if self.compile else 'eager'}/{self.method}"


def environment(device) -> dict:
    import accelerate
    import torch
    facts = {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
             "device": str(device), "cuda": torch.version.cuda, "cudnn": None, "gpu": None,
             "nccl": torch.distributed.is_nccl_available()}
    if device.type == "cuda":
        facts.update(cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(device))
    for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "ffcv"):
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return facts


def make_folder(root: Path, classes: int = 4, per_class: int = 8, size: tuple[int, int] = (48, 40),
                val_per_class: int | None = None, quality: int = 90) -> Path:
    """JPEGs in train/ and val/ class folders, one base colour per class: a smooth random pattern
    (a coarse grid, upsampled) plus fine noise, so that larger ones compress and decode like photos.
    ``size`` is (width, height)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    width, height = size
    bases = rng.integers(40, 216, size=(classes, 3))
    for split, count in (("train", per_class), ("val", per_class // 2 if val_per_class is None else val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(68, 188, size=(6, 8, 3)).astype(np.uint8)  # 128 +- 60
                pattern = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16) - 128
                pixels = bases[c] + pattern + rng.integers(-25, 25, size=(height, width, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=quality)
    return root


def sources(data: Path, backends, work: Path) -> dict:
    """What each backend reads: the folders, or .beton files converted here for ffcv."""
    out = {}
    for backend in backends:
        if backend != "ffcv":
            out[backend] = {"train": data / "train", "val": data / "val"}
            continue
        from loaders.ffcv_convert import convert
        out[backend] = {}
        for split in ("train", "val"):
            beton = work / f"{split}.beton"
            convert(data / split, beton, write_mode="raw", num_workers=1)
            out[backend][split] = beton
    return out


def run_check(path: Check, split_paths: dict, work: Path, device_type: str) -> dict:
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from fasttrain.engine.linear_eval import ExitClassifiers, encode
    from fasttrain.engine.metrics import PeakMemory
    from fasttrain.engine.trainer import build_step, make_accelerator, per_process_batch, train_loader
    from fasttrain.methods import get_method
    from fasttrain.recipe import Recipe
    from loaders import LoaderRequest, build_loader

    AcceleratorState._reset_state(reset_partial_state=False)  # a new precision per path
    GradientState._reset_state()
    recipe = Recipe.model_validate({
        "method": path.method, "loader": path.backend,
        "model": {"arch": "resnet18", "stem": "cifar", "proj_dim": 32},
        "data": {**{k: str(v) for k, v in split_paths.items()}, "image_size": SIZE, "val_resize_ratio": 1.0,
                 "num_workers": 1 if path.backend != "torchvision" else 0, "dali": {"device": path.dali_device}},
        "optim": {"lr": 0.01, "clip_grad_norm": 1.0},
        "schedule": {"epochs": 1, "warmup_epochs": 0, "final_lr_ratio": 1.0},
        "train": {"batch_size": BATCH, "precision": path.precision, "compile": path.compile},
        "run": {"dir": str(work / "run"), "resume": "never", "trackers": []}})
    accelerator = make_accelerator(recipe, log_with=())
    if device_type == "cpu" and accelerator.device.type != "cpu":
        raise RuntimeError(f"asked for the CPU, Accelerate chose {accelerator.device}")
    device, method = accelerator.device, get_method(path.method)
    batch = per_process_batch(recipe, accelerator)
    loader = train_loader(recipe, accelerator, method)
    views, labels = next(iter(loader))
    problems = [f"{what}" for what, ok in (
        (f"{len(views)} views, expected {method.num_views}", len(views) == method.num_views),
        (f"views on {views[0].device}, expected {device}", views[0].device.type == device.type),
        (f"views of dtype {views[0].dtype}", views[0].dtype == torch.float32),
        ("views not channels_last", all(v.is_contiguous(memory_format=torch.channels_last) for v in views)),
        (f"labels {labels.dtype} on {labels.device}",
         labels.dtype == torch.int64 and labels.device.type == device.type),
    ) if not ok]
    if problems:
        raise AssertionError("loader contract: " + "; ".join(problems))

    step = build_step(recipe, accelerator, method, loader.num_classes)  # a constant lr
    model = step.model
    memory = PeakMemory(device)
    memory.reset()
    losses = [float(step(views, labels)[0])]  # the first step also compiles
    started = time.perf_counter()
    for _ in range(STEPS - 1):
        losses.append(float(step(views, labels)[0]))  # float(): waits for the device
    elapsed = time.perf_counter() - started
    memory.sample()
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise AssertionError(f"loss not finite: {losses}")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"loss did not fall over {STEPS} steps on one batch: {losses[0]:.4f} -> {losses[-1]:.4f}")

    encoder = accelerator.unwrap_model(model, keep_torch_compile=False).eval()
    features = encode(encoder, accelerator, views[0])
    heads = ExitClassifiers(encoder.num_exits, encoder.feature_dim, loader.num_classes).to(device)
    probe = torch.optim.SGD(heads.parameters(), lr=0.1)
    probe_loss = sum(torch.nn.functional.cross_entropy(x, labels) for x in heads(features))
    probe_loss.backward()
    probe.step()
    if not torch.isfinite(probe_loss):
        raise AssertionError("linear-evaluation loss not finite")
    if accelerator.num_processes > 1:
        gathered = accelerator.gather(labels)
        if gathered.shape[0] != batch * accelerator.num_processes:
            raise AssertionError(f"gather returned {gathered.shape[0]} labels")

    val = build_loader(path.backend, recipe.data, LoaderRequest(
        split="val", batch_size=batch, augment="center", device=device, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=0))
    val_labels = [int(y) for _, labels_ in val for y in labels_.tolist()]
    if accelerator.num_processes > 1:  # backends shard differently: compare the whole split's labels
        from accelerate.utils import gather_object
        val_labels = sorted(y for part in gather_object([val_labels]) for y in part)
    return {"status": "ok", "images_per_second": (STEPS - 1) * batch * accelerator.num_processes / elapsed,
            "peak_memory_bytes": memory.peak_bytes(), "memory_kind": memory.kind,
            "device_memory_bytes": memory.device_peak, "first_loss": losses[0],
            "last_loss": losses[-1], "val_labels": val_labels}


def plan(device, quick: bool, compiled: tuple[str, ...] | None = None) -> list[Check]:
    """``compiled``: the precisions whose compiled path runs (default: every one, none with ``quick``)."""
    import torch
    if device.type == "cuda":
        precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    else:
        precisions = ["fp32"] if quick else ["fp32", "bf16"]
    paths = [Check(b, p, False, m) for b in BACKENDS for p in precisions for m in METHODS]
    if not quick:  # compiling costs a minute per path on a CPU: once per precision, on the reference loader
        paths += [Check("torchvision", p, True, "selfcon") for p in precisions if compiled is None or p in compiled]
    if device.type == "cuda":  # DALI's CPU pipeline feeding the GPU
        paths += [Check("dali", precisions[0], False, m, dali_device="cpu") for m in METHODS]
    return paths


def installed(backend: str) -> str | None:
    """None if the backend can be imported, else why not."""
    import importlib
    from loaders import BACKENDS as MODULES
    try:
        importlib.import_module(MODULES[backend].module)
    except ImportError as exc:
        return f"not installed ({exc})"
    return None


def format_table(facts: dict, rows: list[dict]) -> str:
    head = ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None)
    lines = [f"fasttrain selftest: {head}", "", "| path | status | img/s | peak memory [MiB] |",
             "|---|---|---|---|"]
    for r in rows:
        speed = f"{r['images_per_second']:.1f}" if r.get("images_per_second") else ""
        peak = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r.get("peak_memory_bytes") is not None else ""
        if r.get("device_memory_bytes"):  # the whole GPU: DALI's pool and outputs are outside torch's allocator
            peak += f" (device {r['device_memory_bytes'] / 2**20:.0f})"
        lines.append(f"| {r['path']} | {r['status']} | {speed} | {peak} |")
    failed = [r for r in rows if r["status"].startswith("failed")]
    lines.append("")
    lines.append(f"{len(failed)} of {len(rows)} paths failed" if failed else "every path this device supports passed")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="fp32 only, no compilation (about a minute on a CPU)")
    parser.add_argument("--compile-precisions", help="comma-separated: compile only these precisions' paths "
                        "(default: every precision; each compile costs tens of seconds)")
    parser.add_argument("--data", type=Path, help="an image folder with train/ and val/ (default: made here)")
    parser.add_argument("--out", type=Path, default=Path("selftest.json"))
    args = parser.parse_args(argv)
    from fasttrain.faults import one_line_errors

    return one_line_errors("fasttrain selftest", lambda: _selftest(args))


def _selftest(args) -> int:
    import os
    import torch
    from fasttrain.errors import UserError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    from accelerate import PartialState
    state = PartialState(cpu=device.type == "cpu")  # several CPU processes form a group only when told so
    facts = environment(device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fasttrain-selftest-") as tmp:
        work = Path(tmp)
        data = args.data or make_folder(work / "images")
        if args.data and not (data / "train").is_dir():
            raise UserError(f"--data {data}: needs train/ and val/ image folders")
        missing = {b: installed(b) for b in BACKENDS}
        ready = [b for b in BACKENDS if missing[b] is None]
        split_paths = sources(data, ready, work)
        compiled = tuple(args.compile_precisions.split(",")) if args.compile_precisions else None
        for path in plan(device, args.quick, compiled):
            if missing[path.backend]:
                rows.append({"path": path.name, "status": f"skipped: {missing[path.backend]}"})
                continue
            try:
                row = run_check(path, split_paths[path.backend], work / path.name.replace("/", "_"), args.device)
            except Exception as exc:  # one line per failed path; the others still run
                where = traceback.extract_tb(exc.__traceback__)[-1]
                detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                row = {"status": f"failed: {detail} ({Path(where.filename).name}:{where.lineno})"}
            rows.append({"path": path.name, **vars(path), **row})
    reference = {}
    for row in rows:  # the same validation files give the same labels, whatever the backend
        if row["status"] == "ok":
            reference.setdefault(row["precision"], row["val_labels"])
            if row["val_labels"] != reference[row["precision"]]:
                row["status"] = "failed: validation labels differ from the other backends'"
    if device.type != "cuda":
        rows += [{"path": name, "status": "skipped: no CUDA device"} for name in GPU_ONLY]
    elif state.num_processes == 1:
        rows.append({"path": "NCCL gather across processes", "status": "skipped: one process (use accelerate launch)"})
    if state.is_main_process:
        from fasttrain.files import write_bytes
        print(format_table(facts, rows))
        write_bytes(args.out, (json.dumps({"environment": facts, "paths": rows}, indent=2) + "\n").encode())
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
