"""Atomic safetensors writes and guarded reads. Nothing here unpickles."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from visionlora.errors import AdapterFileError

__all__ = ["atomic_folder", "atomic_path", "read_safetensors", "write_safetensors", "write_text"]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary file next to ``path``; renamed over ``path`` (after fsync) if the block succeeds.

    A reader, or a crash, sees either the old file or the complete new one, never a partial one.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot create its folder {path.parent} ({exc})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: Path, marker: str) -> Iterator[Path]:
    """A staging folder next to ``path``, put in place of ``path`` when the block succeeds.

    Readers see the old folder or the complete new one. An existing ``path`` is replaced only if
    it is empty or holds ``marker`` (an earlier output of the same kind), so a mistyped path never
    deletes someone's unrelated folder.
    """
    if path.exists():
        if not path.is_dir():
            raise AdapterFileError(f"{path}: is a file; a folder is written here")
        if any(path.iterdir()) and not (path / marker).exists():
            raise AdapterFileError(
                f"{path}: exists and has no {marker}, so it is not an earlier output of this kind; "
                "give a new or empty folder"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot create its folder {path.parent} ({exc})") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(f"{path}: is a folder; give a file path such as {path / 'adapter.safetensors'}")
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, tmp, metadata=dict(metadata))
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file.

    Raises:
        AdapterFileError: naming the file, if it is missing or not a valid safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({exc})") from None
    return tensors, metadata
