"""Where a training step's time goes, part by part (``monitor.profile``, ``--profile`` of the benchmarks).

The trainer's step marks its parts with ``torch.profiler.record_function`` ranges named ``fasttrain/<part>``
(a few microseconds each when no profiler runs): ``data`` (waiting for the loader), ``forward`` (the batch
builder and the model call), ``loss`` (the method's loss), ``gather`` (the loss's cross-process gather),
``backward`` and ``optimizer`` (clipping, lr, step). While profiling, forward hooks split the model call
into ``trunk`` (stem, the four stages, pooling), ``subnetworks`` and ``heads`` (projection heads and
classifiers); a compiled model runs as one graph, so its forward stays one part.

Attribution is exclusive: every profiled op counts for the innermost part around it, so nested parts
(gather inside loss, trunk inside forward) never count twice. On a CPU an op's own (self) time counts;
on CUDA the device time of the kernels it launched, and autograd's backward ops, which CUDA runs on the
engine's device thread outside the ``backward`` range, count as backward by their name. ``step`` is the
wall time of a step. ``data`` on CUDA is the time the device sat idle while the host waited for the
loader (a wait that overlaps kernels queued earlier costs nothing). ``other`` is the rest of the step:
on CUDA the device's other idle gaps and launch overhead, on a CPU the Python between ops. Results: a
Chrome/Perfetto trace, ``profile.json`` and ``profile.md``.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from fasttrain.files import replacing
from fasttrain.tracing import PREFIX, mark

PARTS = ("data", "forward", "trunk", "subnetworks", "heads", "loss", "gather", "backward", "optimizer", "other")
_FORWARD_PARTS = ("data", "forward", "trunk", "subnetworks", "heads", "loss", "gather")
_BACKWARD_OP = "autograd::engine::evaluate_function"
TRACE_NAME = "trace.pt.trace.json.gz"  # TensorBoard's profiler plugin lists *.pt.trace.json(.gz); Perfetto opens it


def timed(batches: Iterable) -> Iterator:
    """``batches``, each wait for the next one marked as ``data``."""
    iterator = iter(batches)
    while True:
        with mark("data"):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


@contextlib.contextmanager
def model_parts(model: torch.nn.Module):
    """Forward hooks that mark a multi-exit encoder's trunk, sub-networks and heads (removed on exit)."""
    groups = {"trunk": [getattr(model, n) for n in ("stem", "layer1", "layer2", "layer3", "layer4", "pool")],
              "subnetworks": list(model.subnetworks.values()),
              "heads": [*model.heads, *([model.classifier] if model.classifier is not None else []),
                        *(model.exit_classifiers or [])]}
    open_ranges: list = []

    def enter(part):
        def hook(module, args):
            open_ranges.append(mark(part).__enter__())
        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    handles = [h for part, modules in groups.items() for m in modules
               for h in (m.register_forward_pre_hook(enter(part)), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _part_of(event) -> Optional[str]:
    """The innermost ``fasttrain/`` range around an event; autograd's ops outside any are backward."""
    node, backward = event, False
    while node is not None:
        if node.name.startswith(PREFIX):
            return node.name[len(PREFIX):]
        backward = backward or node.name.startswith(_BACKWARD_OP)
        node = node.cpu_parent
    return "backward" if backward else None


def _backward_node(event):
    """The autograd node (``evaluate_function``) an event of the backward pass runs in, if any."""
    node = event
    while node is not None and not node.name.startswith(_BACKWARD_OP):
        node = node.cpu_parent
    return node


def idle_time(ranges: Iterable[tuple[float, float]], busy: Iterable[tuple[float, float]]) -> float:
    """The length of ``ranges`` (start, end) during which none of the ``busy`` intervals runs."""
    merged: list[list[float]] = []
    for start, end in sorted(busy):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    idle = 0.0
    for start, end in ranges:
        covered = sum(max(0.0, min(end, b_end) - max(start, b_start)) for b_start, b_end in merged)
        idle += (end - start) - covered
    return idle


def part_times(events, cuda: bool, steps: Optional[int] = None) -> dict:
    """Milliseconds per step of every part of ``PARTS`` and of the whole step (``step``), and
    ``backward_by_part``: the backward split by the forward part each autograd node differentiates,
    matched by its sequence number. ``steps``: the first so many profiled steps (default: all); what
    ran after them (a run that ended inside the window: its epoch-end work) is left out."""
    events = list(events)
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type != DeviceType.CPU]
    events = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    windows = [e for e in events if e.name.startswith("ProfilerStep")][:steps]
    if windows:
        start, end = windows[0].time_range.start, windows[-1].time_range.end
        events = [e for e in events if start <= e.time_range.start < end]
    # an op records the sequence number the next autograd node will get: the last forward op holding a
    # number is the one that made the node (ops before it, such as BatchNorm's counter, made none)
    forward_part = {}
    for event in events:
        part = _part_of(event) if event.sequence_nr >= 0 else None
        if part in _FORWARD_PARTS:
            forward_part[(event.thread, event.sequence_nr)] = part
    totals: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    for event in events:
        part = _part_of(event)
        if part not in PARTS:
            continue
        time = sum(k.duration for k in event.kernels) if cuda else event.self_cpu_time_total
        totals[part] += time
        if part == "backward":
            node = _backward_node(event)
            source = forward_part.get((node.fwd_thread, node.sequence_nr)) if node is not None else None
            backward[source if source in PARTS else "other"] += time
    if cuda:  # the loader's wait launches no kernel: count the time the device sat idle during it
        totals["data"] = idle_time([(e.time_range.start, e.time_range.end) for e in events
                                    if e.name == PREFIX + "data"], kernels)
    per_step = max(1, len(windows)) * 1000
    row = {part: totals.get(part, 0.0) / per_step for part in PARTS if part != "other"}
    row["step"] = sum(e.cpu_time_total for e in windows) / per_step
    row["other"] = max(0.0, row["step"] - sum(row[p] for p in PARTS if p != "other"))
    row = {p: row[p] for p in ("step", *PARTS)}
    row["backward_by_part"] = {p: backward[p] / per_step for p in PARTS if backward.get(p)}
    return row


class StepProfiler:
    """torch.profiler over ``steps`` training steps after the first ``skip``; call ``step()`` after each.
    When the window ends it writes the trace into ``out_dir`` and keeps the per-part times in ``parts``."""

    def __init__(self, device: torch.device, out_dir: Path, skip: int = 5, steps: int = 5, model=None):
        self.cuda, self.out_dir, self.model = device.type == "cuda", Path(out_dir), model
        self.device_kind = torch.cuda.get_device_name(device) if self.cuda else "cpu"
        self.parts: Optional[dict] = None
        self.skip, self.steps, self.calls, self.profiled_steps = skip, steps, 0, 0
        self.trace: Optional[Path] = None
        if not self.cuda:  # kineto's start/stop notes and its failed GPU query say nothing on a CPU
            os.environ.setdefault("KINETO_LOG_LEVEL", "99")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # one step of profiler warm-up before the window (its first step carries set-up costs)
        schedule = torch.profiler.schedule(skip_first=max(0, skip - 1), wait=0, warmup=1 if skip else 0,
                                           active=steps, repeat=1)
        self._profiler = torch.profiler.profile(activities=activities, schedule=schedule,
                                                on_trace_ready=self._ready, acc_events=True)
        self._hooks = contextlib.ExitStack()

    def __enter__(self) -> "StepProfiler":
        if self.model is not None:
            self._hooks.enter_context(model_parts(self.model))
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._profiler.__exit__(*exc)
        finally:
            self._hooks.close()

    def step(self) -> None:
        self.calls += 1
        self._profiler.step()
        if self.parts is not None:  # the window is over: the hooks' few microseconds are no longer needed
            self._hooks.close()

    def _ready(self, profiler) -> None:
        self.profiled_steps = max(0, min(self.steps, self.calls - self.skip))
        if not self.profiled_steps:  # stopped before the window (torch reports its warm-up step)
            return
        self.parts = part_times(profiler.events(), self.cuda, self.profiled_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trace = self.out_dir / TRACE_NAME
        with replacing(self.trace) as tmp, tempfile.NamedTemporaryFile(suffix=".json") as raw:
            profiler.export_chrome_trace(raw.name)
            with open(raw.name, "rb") as source, gzip.open(tmp, "wb") as target:
                shutil.copyfileobj(source, target)


def parts_table(rows: list[dict], label: str) -> str:
    """Two markdown tables, one row per profiled run (``label`` names the row): ms per step and share of
    every part, then the backward split by the forward part it differentiates."""
    def cell(value, total):
        return f"{value:.1f} ({100 * value / total:.0f}%)" if total else "–"

    lines = [f"| {label} | step [ms] | " + " | ".join(PARTS) + " |", "|" + "---|" * (len(PARTS) + 2)]
    for row in rows:
        parts = row["parts"]
        lines.append(f"| {row[label]} | {parts['step']:.1f} | "
                     + " | ".join(cell(parts[p], parts["step"]) for p in PARTS) + " |")
    sources = [p for p in PARTS if any(r["parts"]["backward_by_part"].get(p) for r in rows)]
    lines += ["", f"| {label} | backward [ms] | " + " | ".join(f"of {p}" for p in sources) + " |",
              "|" + "---|" * (len(sources) + 2)]
    for row in rows:
        parts = row["parts"]
        lines.append(f"| {row[label]} | {parts['backward']:.1f} | " + " | ".join(
            cell(parts["backward_by_part"].get(p, 0.0), parts["backward"]) for p in sources) + " |")
    return "\n".join(lines) + "\n"
