"""Writing files so that nothing already written is lost: every file goes to ``.NAME.tmp-PID`` beside its
final name and is renamed over it when complete; temp files of processes that no longer run are swept
at the next start. The bottom layer: nothing here imports the rest of the project."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("fasttrain")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block completes it replaces ``path`` atomically,
    when it fails (an error, a stop signal) it is removed and ``path`` is untouched. A write error
    names the final file (a full disk raised from a file object names none)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) != tmp:
            raise
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}", str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path`` (its folder made if missing), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (anything JSON cannot hold, such as a path, as its string), atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG under a temp name, renamed when complete; the figure is closed."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with replacing(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def sweep_stale_temps(directory: Path, name: str = "*") -> list[Path]:
    """Remove ``.NAME.tmp-PID`` files in ``directory`` whose writer process no longer runs."""
    removed = []
    for tmp in Path(directory).glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
            log.warning("removed %s, left half-written by a process that no longer runs", tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
