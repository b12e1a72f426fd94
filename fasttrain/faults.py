"""Faults a run must survive without losing what it wrote: stop signals and half-written files.

* A stop signal (SIGTERM; SIGINT is Python's KeyboardInterrupt) becomes an exception in the main
  process, so every ``finally`` runs: temp files are removed, progress bars closed, and the CLI
  prints one line and exits ``128 + signal``.
* A process started by ``accelerate launch`` (or torchrun) dies with its launcher: the single-process
  launcher neither forwards SIGTERM nor kills its child, which would otherwise train on, orphaned,
  into a run dir a requeued job also uses.
* Files are written atomically by ``fasttrain.files``.
* A crash that is not a bug of this process (a loader worker or another process of the run killed) is
  described in one line (``describe_crash``).
* Every command fails the same way (``one_line_errors``): one line, an exit status, no traceback.

The bottom layer: nothing here imports the rest of the project but ``fasttrain.errors``.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from fasttrain.errors import UserError

log = logging.getLogger("fasttrain")
_PR_SET_PDEATHSIG = 1


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt: ``except Exception`` lets it pass.
    ``detail``: what was saved before stopping (the trainer's checkpoint of the exact position)."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = signum, detail
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # schedulers' preemption notices (SLURM: --signal=USR1@T)
_deferred = False
_pending: Optional[int] = None
_handled: set[int] = set()


def stop_on_signals(names=STOP_SIGNALS) -> None:
    """Turn the signals ``names`` into :class:`Stopped` in this (main) process, or, inside
    :func:`deferred_stops`, into a request the trainer honours at the next step boundary; forked helpers
    (loader workers, converter workers) exit quietly instead, leaving the report to the main process.
    Called again (with the recipe's ``run.stop_signals``), signals no longer named get their default action."""
    main_pid = os.getpid()
    signums = {signal.Signals[name].value for name in names}

    def handler(signum, frame):
        global _pending
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        if _deferred:
            _pending = _pending or signum
            return
        raise Stopped(signum)

    for signum in _handled - signums:
        signal.signal(signum, signal.SIG_DFL)
    for signum in signums:
        signal.signal(signum, handler)
    _handled.clear()
    _handled.update(signums)
    if _launched_by_a_launcher():
        _die_with_parent()


@contextlib.contextmanager
def deferred_stops() -> Iterator[None]:
    """Inside, a stop signal is only recorded (:func:`pending_stop`): a training step is never cut in
    half. A stop still pending when the block ends is raised then."""
    global _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = False
    if _pending:
        raise Stopped(_pending)


def pending_stop() -> Optional[int]:
    """The stop signal received inside :func:`deferred_stops`, if any."""
    return _pending


def _launched_by_a_launcher() -> bool:
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:3]
    except OSError:
        return False
    return any(b"accelerate" in a or b"torchrun" in a or b"torch.distributed.run" in a for a in args)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it exits."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher was gone before the request took effect
        raise Stopped(signal.SIGTERM)


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file."""
    what = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) not in what:
        what = f"{exc.filename}: {what}"
    return what


# what a crash of a loader worker or of another process of the run says (torch's own words)
_WORKER_DIED = ("DataLoader worker (pid",)
_PEER_DIED = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "ProcessGroupNCCL", "ProcessGroupGloo", "Socket Timeout", "failed to recv", "failed to send")


def describe_crash(exc: BaseException) -> Optional[str]:
    """One line for a crash that is not this process's bug: a loader worker killed (most often by the
    kernel, out of memory), or another process of the run gone. None for anything else."""
    import torch.distributed as dist

    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if any(marker in text for marker in _WORKER_DIED):
        return (f"a data loader worker died ({text}); a worker killed by the system most often ran out of memory: "
                f"lower data.num_workers")
    if isinstance(exc, getattr(dist, "DistBackendError", ())) or any(m in text for m in _PEER_DIED):
        return f"another process of this run stopped ({text[:160]}); this one stops too"
    return None


def one_line_errors(prog: str, body: Callable[[], int], *, kept: str = "", crashes: bool = False) -> int:
    """Every command's way to fail: run ``body`` (its exit status) and turn what a user can act on
    into one line on stderr and an exit status, no traceback. A UserError (a key, flag, path or file)
    or a missing file: 2; another OSError (disk full, no permission): 1; a stop signal: 128 + its
    number; Ctrl-C: 130. ``kept``: what the line adds about what survives (e.g. "; the last
    checkpoint is intact"). ``crashes``: a loader worker's or another process's death
    (describe_crash) is one line and 1 too; any other exception is a bug, and its traceback is what
    to report."""
    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a path given that is not there
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {describe_os_error(exc)}{kept}", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(f"{prog}: stopped by {stop.name}{stop.detail or kept}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        why = describe_crash(exc) if crashes else None
        if why is None:
            raise
        print(f"{prog}: error: {why}{kept}", file=sys.stderr)
        return 1
