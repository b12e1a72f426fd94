"""Measuring and recording: peak memory, throughput, metrics files (JSONL + CSV) beside TensorBoard."""
from __future__ import annotations

import csv
import io
import json
import logging
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from fasttrain.files import write_bytes

log = logging.getLogger("fasttrain")


class PeakMemory:
    """Peak memory of a phase: CUDA's max_memory_allocated on GPU; on CPU the peak resident set
    above the resident set at ``reset()`` (Linux resets VmHWM through /proc/self/clear_refs).

    On a GPU, PyTorch's allocator does not see DALI's memory pool nor the DALI outputs it hands over
    zero-copy, nor nvJPEG's buffers: ``sample()`` (called at logged steps) keeps the peak of the whole
    device's used memory (``torch.cuda.mem_get_info``: every allocator, the CUDA context, and any
    other process on that GPU), the number to compare across loader backends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_above_baseline"
        self.baseline = 0
        self.device_peak: Optional[int] = None  # CUDA: the whole device's used bytes, at the samples

    def sample(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_peak = max(self.device_peak or 0, total - free)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline, self.device_peak = torch.cuda.memory_allocated(self.device), None
            self.sample()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "cpu_peak_rss_since_start"  # peak cannot be reset here: the process's peak
        self.baseline = _status_kib("VmRSS") * 1024

    def peak_bytes(self) -> int:
        """CUDA: everything allocated at the peak (weights included, as the papers' GiB per GPU);
        CPU: the resident set's peak above ``reset()``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        peak = _status_kib("VmHWM") * 1024 or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.baseline)


    def peak_above_reset(self) -> int:
        """The peak above what was held at ``reset()``, on either device: what the measured phase added."""
        return max(0, self.peak_bytes() - self.baseline) if self.device.type == "cuda" else self.peak_bytes()


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Throughput:
    """Images per second of the training steps after the ``skip``-th (compilation and warm-up).
    The clock runs from that step to ``stop()`` (an epoch's end) and again from ``resume()`` (the
    next epoch's start), so epoch-end work (checkpoints, k-NN) is not counted. Both ends wait for
    the device, so on a GPU the clock brackets finished work, not queued kernels."""

    def __init__(self, device: torch.device, skip: int = 2):
        self.device, self.skip, self.steps, self.images = device, skip, 0, 0
        self.elapsed = 0.0
        self.start: Optional[float] = None  # set while the clock runs

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def update(self, images: int) -> None:
        self.steps += 1
        if self.steps == self.skip:
            self.start = self._now()
        elif self.steps > self.skip:
            self.images += images

    def stop(self) -> None:
        """The clock stops here (end of an epoch's steps), not when the value is read."""
        if self.start is not None:
            self.elapsed += self._now() - self.start
            self.start = None

    def resume(self) -> None:
        if self.steps >= self.skip and self.start is None:
            self.start = self._now()

    @property
    def images_per_second(self) -> Optional[float]:
        if not self.images:
            return None
        running = time.perf_counter() - self.start if self.start is not None else 0.0
        if self.elapsed + running <= 0:
            return None
        return self.images / (self.elapsed + running)


class MetricsFile:
    """Appends one row per record to ``metrics.jsonl`` and ``metrics.csv`` (main process only).

    A run that starts afresh starts empty files; a resumed run keeps the rows up to the step it
    resumes from (``resume_step``) and drops what an interrupted run logged after its checkpoint:
    the kept rows are written under a temporary name and renamed over the old files, so a stop at
    any moment leaves either the old history or the new one, never less. A torn last line (what
    kill -9 or a full disk leaves) is dropped with a warning."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.jsonl, self.csv = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "metrics.csv"
        if not enabled:
            return
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step is not None else []
        write_bytes(self.jsonl, "".join(json.dumps(row) + "\n" for row in kept).encode())
        write_bytes(self.csv, _csv_text(kept, header=True).encode())

    def read(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        rows = []
        for number, line in enumerate(self.jsonl.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: line %d is not a JSON record (a torn write): left out", self.jsonl, number)
        return rows

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.csv.open("a", newline="") as f:
            f.write(_csv_text([row], header=f.tell() == 0))


def _csv_text(rows: list[dict], header: bool) -> str:
    """Long-format CSV: one line per (row, key)."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(["kind", "epoch", "step", "key", "value"])
    for row in rows:
        for key, value in row.items():
            if key not in ("kind", "epoch", "step"):
                writer.writerow([row.get("kind"), row.get("epoch"), row.get("step"), key, value])
    return out.getvalue()
