"""Atomic safetensors writes and guarded reads. Nothing here unpickles.

Every write goes to a temporary file (or folder) beside its target and is renamed into place once
complete and fsynced, so a reader, a crash or a SIGKILL sees the old output or the new one, never
a mix. Temporaries are hidden (``.<name>.<random>.tmp``); a killed write can leave one behind, but
never in place of an output. A write that fails (a full disk included) raises an
:class:`~visionlora.AdapterFileError` naming the target and removes its temporary.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from visionlora.errors import AdapterFileError

__all__ = [
    "atomic_folder",
    "atomic_path",
    "read_safetensors",
    "refuse_existing",
    "swap_folder",
    "write_safetensors",
    "write_text",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class _WriteFailed(AdapterFileError):
    """A write failed in the operating system (disk full, permissions, ...); ``reason`` says how."""

    def __init__(self, path: Path, reason: str, existed: bool) -> None:
        kept = "the existing one is unchanged" if existed else "nothing was written"
        super().__init__(f"{path}: could not be written ({reason}); {kept}")
        self.reason = reason


def _reason(exc: BaseException) -> str:
    """An OS-level write failure in words; safetensors reports them as ``SafetensorError('... (os error N)')``."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return os.strerror(code) if code is not None else str(exc)


def refuse_existing(path: Path, overwrite: bool, marker: str | None = None) -> None:
    """Raise unless writing ``path`` is allowed: it does not exist, or ``overwrite`` is set.

    With ``marker`` a folder is written: an empty one may always be replaced, and even with
    ``overwrite`` only one holding ``marker`` (an earlier output of the same kind), so a mistyped
    path never deletes someone's unrelated folder. Without it a file is written.

    Raises:
        AdapterFileError: naming ``path`` and what would be accepted.
    """
    if not path.exists():
        return
    if marker is None:
        if path.is_dir():
            raise AdapterFileError(f"{path}: is a folder; give a file path such as {path / 'adapter.safetensors'}")
    elif not path.is_dir():
        raise AdapterFileError(f"{path}: is a file; a folder is written here")
    elif not any(path.iterdir()):
        return
    elif not (path / marker).exists():
        raise AdapterFileError(
            f"{path}: exists and has no {marker}, so it is not an earlier output of this kind; "
            "give a new or empty folder"
        )
    if not overwrite:
        raise _exists(path)


def _exists(path: Path) -> AdapterFileError:
    return AdapterFileError(
        f"{path}: exists; pass overwrite=True (--overwrite on the command line) to replace it, or choose another path"
    )


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot create its folder {path.parent} ({_reason(exc)})") from None


def _sync_folder(folder: Path) -> None:
    """fsync a folder so the renames in it survive a power cut (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _put_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists, even if another writer creates it meanwhile."""
    try:
        os.link(tmp, path)  # fails if path exists: no check-then-rename race
    except FileExistsError:
        raise _exists(path) from None
    except OSError:  # a filesystem without hard links
        refuse_existing(path, overwrite=False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: Path, *, overwrite: bool = True) -> Iterator[str]:
    """A temporary file next to ``path``; renamed over ``path`` (after fsync) if the block succeeds.

    A reader, or a crash, sees either the old file or the complete new one, never a partial one.
    With ``overwrite=False`` an existing ``path`` is refused (before and at the rename).

    Raises:
        AdapterFileError: ``path`` exists and ``overwrite`` is off, or the write failed in the
            operating system (e.g. no space left); the old file is intact and the temporary removed.
    """
    if not overwrite:
        refuse_existing(path, overwrite)
    _make_parent(path)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _WriteFailed(path, _reason(exc), existed) from None
    os.close(fd)
    try:
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                _put_new(tmp, path)
        except (OSError, SafetensorError) as exc:
            raise _WriteFailed(path, _reason(exc), existed) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl before 1.2.5, old glibc)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_folder(new: Path, path: Path, old: Path) -> Path | None:
    """Put folder ``new`` at ``path``; return where the previous ``path`` now is (None if there was none).

    On Linux the two folders trade places in one atomic step, so ``path`` never goes missing and
    the previous content ends up at ``new``. Elsewhere ``path`` is first moved to ``old`` (which
    must not exist), leaving a moment without ``path``. The caller deletes what is returned.
    """
    if not path.exists():
        os.rename(new, path)  # refuses (ENOTEMPTY) a non-empty folder created meanwhile
    elif _exchange(new, path):
        _sync_folder(path.parent)
        return new
    else:
        os.replace(path, old)
        os.replace(new, path)
        _sync_folder(path.parent)
        return old
    _sync_folder(path.parent)
    return None


def _put_new_folder(staging: Path, path: Path) -> None:
    """Move ``staging`` to ``path`` unless a non-empty ``path`` appeared meanwhile (rename refuses to replace one)."""
    try:
        os.rename(staging, path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _exists(path) from None
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: Path, marker: str, *, overwrite: bool = True) -> Iterator[Path]:
    """A staging folder next to ``path``, put in place of ``path`` when the block succeeds.

    Readers see the old folder or the complete new one (see :func:`swap_folder`). An existing
    non-empty ``path`` is replaced only with ``overwrite`` and only if it holds ``marker`` (an
    earlier output of the same kind), so a mistyped path never deletes someone's unrelated folder.

    Raises:
        AdapterFileError: ``path`` may not be replaced, or the write failed in the operating
            system (e.g. no space left); the old folder is intact and the staging folder removed.
    """
    refuse_existing(path, overwrite, marker)
    _make_parent(path)
    existed = path.exists()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise _WriteFailed(path, _reason(exc), existed) from None
    try:
        try:
            yield staging
            if overwrite:
                previous = swap_folder(staging, path, staging.with_name(staging.name + ".old"))
            else:
                _put_new_folder(staging, path)
                previous = None
        except (OSError, SafetensorError) as exc:
            raise _WriteFailed(path, _reason(exc), existed) from exc
        except _WriteFailed as exc:  # a file inside the staging folder: name the folder the caller asked for
            raise _WriteFailed(path, exc.reason, existed) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = True,
) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    path = Path(path)
    refuse_existing(path, overwrite=True)  # a folder is refused here whatever ``overwrite`` says
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(plain, tmp, metadata=dict(metadata))
    return path


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); return the path."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header (tensor index plus metadata) visionlora parses; real adapters stay far below."""


def _check_header_size(path: Path) -> None:
    """Refuse a file whose 8-byte header length is out of bounds before anything parses the header."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(prefix) < 8:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({size} bytes; the header length alone is 8)")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise AdapterFileError(
            f"{path}: not a valid safetensors file (its header claims {length} bytes; "
            f"visionlora reads headers up to {MAX_HEADER_BYTES})"
        )
    if 8 + length > size:
        raise AdapterFileError(
            f"{path}: not a valid safetensors file (truncated: its header claims {length} bytes, the file has {size})"
        )


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file.

    Raises:
        AdapterFileError: naming the file, if it is missing or not a valid safetensors file.
    """
    return _read(Path(path), load_tensors=True)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors.

    Raises:
        AdapterFileError: naming the file, if it is missing or not a valid safetensors file.
    """
    return _read(Path(path), load_tensors=False)[1]


def _read(path: Path, load_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    _check_header_size(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = f.keys() if load_tensors else []
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({exc})") from None
    return tensors, metadata
