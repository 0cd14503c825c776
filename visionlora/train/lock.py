"""One training run per output folder: ``<out>/.visionlora.lock`` names the run that holds it.

The lock file is created exclusively (``O_CREAT | O_EXCL``) and holds the process id, host name
and start time of its holder. A second run pointed at the same folder is refused with a
:class:`~visionlora.TrainingError` naming the holder. A lock whose holder is gone (same host, no
process with that id) is taken over with a warning, so a killed run does not block the folder.
Only the main process of a multi-process run takes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visionlora.errors import ConfigError, TrainingError
from visionlora.train.checkpoint import checkpoint_dirs

__all__ = ["LOCK_NAME", "claim_output", "output_lock"]

LOCK_NAME = ".visionlora.lock"
_EARLIER = ("adapter.safetensors", "metrics.json")
# What a write killed midway leaves (see visionlora.io.files): ".<name>.<mkstemp's 8>.tmp" files,
# ".<name>.<8>" staging folders (".old" while swapping), safetensors' own ".tmpXXXXXX", and ours.
_LEFTOVER = re.compile(
    r"^\.(.+\.[a-z0-9_]{8}(\.tmp|\.old)?|tmp[A-Za-z0-9]{6}|old-checkpoints|visionlora\.lock\.stale-\d+)$"
)
logger = logging.getLogger(__name__)


def _running(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (where that cannot be told: True)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _holder(text: str) -> dict[str, Any] | None:
    try:
        found = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(found, dict) and isinstance(found.get("pid"), int) and isinstance(found.get("host"), str)
    return found if ok else None


def _take_over(lock: Path, stale: str) -> None:
    """Remove ``lock`` if it still holds ``stale``: renamed first, so a lock another run just took survives."""
    grave = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return
    if grave.read_text(encoding="utf-8") == stale:
        grave.unlink()
    else:  # not the lock judged stale: put it back
        os.replace(grave, lock)


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.visionlora.lock`` for the block (the folder is created if needed); release it after.

    Raises:
        TrainingError: a live run holds the lock (naming its pid, host and start), or it cannot be read.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = lock.read_text(encoding="utf-8")
            except FileNotFoundError:  # released meanwhile
                continue
            holder = _holder(held)
            if holder is None:
                raise TrainingError(
                    f"{folder}: {LOCK_NAME} exists but does not name a run ({held[:100]!r}); "
                    "delete it if no run uses this folder"
                ) from None
            pid, host, started = holder["pid"], holder["host"], holder.get("started", "?")
            if host != socket.gethostname() or _running(pid):
                raise TrainingError(
                    f"{folder}: another training run (pid {pid} on {host}, started {started}) is writing to this "
                    f"folder; wait for it, choose another output folder, or delete {lock} if that run is gone"
                ) from None
            logger.warning(
                "%s: taking over the lock of pid %d (started %s), which is no longer running", folder, pid, started
            )
            _take_over(lock, held)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        break
    else:
        raise TrainingError(f"{folder}: could not take {LOCK_NAME}; other runs keep taking it")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text(encoding="utf-8") == mine:
                lock.unlink()


def _remove_leftovers(folder: Path) -> None:
    """Temporaries of writes killed midway, in a folder this process holds the lock of (so none is in use)."""
    for entry in folder.iterdir():
        if _LEFTOVER.match(entry.name) and entry.name != LOCK_NAME:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _earlier_run(folder: Path) -> list[str]:
    found = [name for name in _EARLIER if (folder / name).exists()]
    return found + (["checkpoints/"] if checkpoint_dirs(folder / "checkpoints") else [])


@contextlib.contextmanager
def claim_output(folder: Path, *, main: bool, resume: str | None, overwrite: bool) -> Iterator[None]:
    """Hold the output folder for a training run (main process only; other processes pass through).

    A fresh run (no ``resume``) is refused where an earlier run left its results, unless
    ``overwrite``: then the earlier run's checkpoints are removed first, so ``--resume latest``
    can never pick one of them up. Temporaries that killed writes left in the folder are removed.

    Raises:
        TrainingError: another live run holds the folder.
        ConfigError: the folder holds an earlier run and neither ``resume`` nor ``overwrite`` is given.
    """
    if not main:
        yield
        return
    with output_lock(folder):
        _remove_leftovers(folder)
        earlier = _earlier_run(folder)
        if earlier and resume is None:
            if not overwrite:
                raise ConfigError(
                    f"{folder}: holds an earlier run ({', '.join(earlier)}); continue it with --resume "
                    "(resume='latest'), start afresh with --overwrite (overwrite=True; its checkpoints are "
                    "removed), or choose another output folder"
                )
            doomed = folder / ".old-checkpoints"
            shutil.rmtree(doomed, ignore_errors=True)
            if (folder / "checkpoints").exists():
                os.replace(folder / "checkpoints", doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        yield
