"""Resumable training checkpoints: safetensors + JSON only, written atomically, pruned to the newest N.

A checkpoint folder ``checkpoints/step-000120/`` holds:

- ``trainable.safetensors``: every parameter that trains and every persistent buffer;
- ``optimizer.safetensors``: the optimizer's state tensors, with its param groups in the header;
- ``rng-<rank>.safetensors``: each process's torch (and CUDA) RNG state, Python's and NumPy's in the header;
- ``state.json``: step, epoch, position in the epoch, LR scheduler and grad-scaler state, history.

The folder is assembled under a temporary name (``.tmp-step-000120``) and renamed into place
when complete; a rewritten step trades places with the old folder in one step (see
:func:`~visionlora.io.files.swap_folder`), and pruning renames a folder to ``.old-step-*`` before
deleting it. So a ``step-*`` folder is always complete, and a run killed at any moment leaves the
previous checkpoints intact and resumes from the newest. Weights with NaN/Inf are never written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.config import is_finite_number
from visionlora.errors import AdapterFileError, ConfigError, TrainingError
from visionlora.io.files import read_safetensors, swap_folder, write_safetensors, write_text
from visionlora.train.sharding import full_tensor, like_param, trained_tensors

__all__ = ["checkpoint_dirs", "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "save_checkpoint"]

_NAME = re.compile(r"^step-(\d{6,})$")
_PARTS = ("state.json", "trainable.safetensors", "optimizer.safetensors")
_MAX_STATE_BYTES = 64 * 1024 * 1024  # per-step loss histories of long runs stay far below


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step-*`` folder under ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root`` (all of state.json, trainable and optimizer files), oldest first."""
    return [p for p in _step_dirs(root) if all((p / part).is_file() for part in _PARTS)]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of the run in ``run_dir``.

    Raises:
        ConfigError: if the run has none.
    """
    found = checkpoint_dirs(run_dir / "checkpoints")
    if not found:
        raise ConfigError(f"--resume: {run_dir} has no complete checkpoint under checkpoints/")
    return found[-1]


def prune_checkpoints(root: Path, keep: int, current: int) -> None:
    """Keep the newest ``keep`` checkpoints up to step ``current``; remove the rest, temporary folders of
    interrupted writes, and checkpoints after ``current`` (a run resumed from an older one replaced them)."""
    complete = checkpoint_dirs(root)
    ours = [p for p in complete if int(p.name.split("-")[1]) <= current]
    for old in [p for p in _step_dirs(root) if p not in ours] + ours[:-keep]:
        _remove(old)
    for tmp in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a hidden ``.old-step-*``, never a partial ``step-*``."""
    doomed = folder.with_name(f".old-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(folder, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    header = {"python": json.dumps([version, list(internal), gauss])}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        header["numpy"] = json.dumps([name, int(pos), int(has_gauss), float(cached)])
    except ImportError:
        pass
    return tensors, header


def _numpy() -> Any:
    """NumPy if it is installed, else None."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _set_rng_state(where: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Callable[[], None]:
    """Set torch's, CUDA's, Python's and NumPy's RNG from a checkpoint; return what puts the old states back.

    Raises:
        AdapterFileError: a state the generators refuse (nothing is left changed).
    """
    np = _numpy()
    old_torch, old_python = torch.get_rng_state(), random.getstate()
    old_numpy = np.random.get_state() if np is not None else None
    old_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def undo() -> None:
        torch.set_rng_state(old_torch)
        random.setstate(old_python)
        if np is not None:
            np.random.set_state(old_numpy)
        if old_cuda is not None:
            torch.cuda.set_rng_state_all(old_cuda)

    try:
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = _json_entry(where, header, "python")
        random.setstate((version, tuple(internal), gauss))
        if "numpy" in tensors and np is not None:
            name, pos, has_gauss, cached = _json_entry(where, header, "numpy")
            np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        undo()
        if isinstance(exc, AdapterFileError):
            raise
        raise AdapterFileError(f"{where}: not a random-generator state ({type(exc).__name__}: {exc})") from None
    return undo


def _json_entry(where: Path, header: dict[str, str], key: str) -> Any:
    """The JSON value of header entry ``key`` of the safetensors file ``where``."""
    if key not in header:
        raise AdapterFileError(f"{where}: no {key!r} header entry")
    try:
        return json.loads(header[key])
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{where}: header entry {key!r} is not JSON ({type(exc).__name__})") from None


def _same_structure(found: Any, expected: Any) -> bool:
    """Whether JSON ``found`` has the keys, lengths and value types of ``expected`` (a live object's state dict)."""
    if isinstance(expected, dict):
        return (
            isinstance(found, dict)
            and set(found) == {str(k) for k in expected}
            and all(_same_structure(found[str(k)], v) for k, v in expected.items())
        )
    if isinstance(expected, (list, tuple)):
        return isinstance(found, list) and len(found) == len(expected) and all(map(_same_structure, found, expected))
    if isinstance(expected, (bool, str)) or expected is None:
        return type(found) is type(expected)
    if isinstance(expected, int):
        return isinstance(found, int) and not isinstance(found, bool)
    if isinstance(expected, float):
        return is_finite_number(found)
    return False


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer's tensors, whole (gathered when sharded: every process calls), and its JSON header."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = full_tensor(value)
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}


def _optimizer_state_dict(
    where: Path, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], header: dict[str, str]
) -> dict[str, Any]:
    """The optimizer state a checkpoint holds, checked against ``optimizer``'s groups and parameter shapes."""
    groups = _json_entry(where, header, "param_groups")
    expected = optimizer.state_dict()["param_groups"]
    if not _same_structure(groups, expected) or [g["params"] for g in groups] != [g["params"] for g in expected]:
        raise AdapterFileError(
            f"{where}: its param_groups do not match this run's optimizer (other groups or settings)"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        i = int(index) if index.isascii() and index.isdecimal() and len(index) < 10 else -1
        fits = 0 <= i < len(params) and name and value.shape in (torch.Size([]), params[i].shape)
        if not fits or value.is_complex() or value.dtype == torch.bool:
            raise AdapterFileError(f"{where}: tensor {key!r} {tuple(value.shape)} is no state of this run's parameters")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{where}: tensor {key!r} holds NaN or Inf")
        state.setdefault(i, {})[name] = like_param(value, params[i])
    scalars = _json_entry(where, header, "scalars")
    if not isinstance(scalars, dict):
        raise AdapterFileError(f"{where}: header entry 'scalars' is not a JSON object")
    for index, values in scalars.items():
        i = int(index) if index.isascii() and index.isdecimal() and len(index) < 10 else -1
        if (
            not 0 <= i < len(params)
            or not isinstance(values, dict)
            or not all(v is None or isinstance(v, (bool, str)) or is_finite_number(v) for v in values.values())
        ):
            raise AdapterFileError(f"{where}: header entry 'scalars' has an invalid entry for {index!r}")
        state.setdefault(i, {}).update(values)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` (every process calls this; rank 0 writes the shared parts).

    ``state`` is JSON-able (step, epoch, scheduler and scaler state, history). ``barrier`` is a
    callable that waits for every process (accelerate's ``wait_for_everyone``).

    Raises:
        TrainingError: a trained tensor holds NaN/Inf (nothing is written; every process raises).
    """
    trainable = {k: full_tensor(v) for k, v in trained_tensors(model).items()}
    opt_tensors, opt_header = _optimizer_state(optimizer)
    bad = [k for k, v in trainable.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        kept = checkpoint_dirs(root)
        raise TrainingError(
            f"{root}: checkpoint step {step} not written, {', '.join(bad[:5])} hold NaN/Inf; the last good "
            f"checkpoint is {kept[-1] if kept else 'none'}"
        )
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    wait = barrier or (lambda: None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    rng_tensors, rng_header = _rng_state()
    write_safetensors(tmp / f"rng-{rank}.safetensors", rng_tensors, rng_header)
    wait()
    if rank == 0:
        write_safetensors(tmp / "trainable.safetensors", trainable, {"format": "pt"})
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors, opt_header)
        write_text(tmp / "state.json", json.dumps({**state, "world_size": world_size}, indent=1))
        old = root / f".old-step-{step:06d}"
        shutil.rmtree(old, ignore_errors=True)
        previous = swap_folder(tmp, final, old)  # the same step written again (a resumed run): swapped
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    wait()
    return final


def load_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    stateful: Mapping[str, Any] | None = None,
    check_state: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Restore model tensors, optimizer and this process's RNG from ``folder``; return its ``state.json``.

    A process the checkpoint has no RNG state for (it was written by fewer processes) takes the
    first process's.

    ``stateful`` maps ``state.json`` keys to objects with ``state_dict``/``load_state_dict`` (the
    LR scheduler, the grad scaler) restored from them; a key stored as null is skipped. Everything
    is read and checked before anything changes (``state.json`` by ``check_state`` too, which
    raises on a state it refuses): on any error the model, optimizer, RNG and those objects are
    left as they were.

    Raises:
        AdapterFileError: the folder is incomplete, malformed, or does not fit this run.
    """
    state = _read_state(folder)
    if check_state is not None:
        check_state(state)
    trainable, _ = read_safetensors(folder / "trainable.safetensors")
    opt_tensors, opt_header = read_safetensors(folder / "optimizer.safetensors")
    rng_file = folder / f"rng-{rank}.safetensors"
    if not rng_file.is_file():  # a run resumed on more processes than wrote it: they start where the first was
        rng_file = folder / "rng-0.safetensors"
    rng = read_safetensors(rng_file) if rng_file.is_file() else None
    current = model.state_dict()
    bad = sorted(k for k, v in trainable.items() if k not in current or current[k].shape != v.shape)
    missing = sorted(k for k in trained_tensors(model) if k not in trainable)
    if bad or missing:
        raise AdapterFileError(
            f"{folder}: does not fit this run's model: unknown or reshaped {bad[:10]}, missing {missing[:10]}"
        )
    for key, value in trainable.items():
        target = current[key]
        same_kind = value.is_floating_point() == target.is_floating_point() and not value.is_complex()
        if not same_kind or (not target.is_floating_point() and value.dtype != target.dtype):
            raise AdapterFileError(f"{folder}: tensor {key!r} is {value.dtype}, the model's is {target.dtype}")
        if target.is_floating_point() and not torch.isfinite(value.to(target.dtype)).all():
            raise AdapterFileError(f"{folder}: tensor {key!r} holds NaN or Inf (in the model's {target.dtype})")
    optimizer_state = _optimizer_state_dict(folder / "optimizer.safetensors", optimizer, opt_tensors, opt_header)
    objects = {k: v for k, v in (stateful or {}).items() if v is not None}
    for key, obj in objects.items():
        if key not in state:
            raise AdapterFileError(f"{folder / 'state.json'}: no {key!r} entry")
        if state[key] is not None and not _same_structure(state[key], obj.state_dict()):
            raise AdapterFileError(f"{folder / 'state.json'}: {key!r} does not match this run's {type(obj).__name__}")
    undo_rng = _set_rng_state(rng_file, *rng) if rng is not None else None
    try:
        optimizer.load_state_dict(optimizer_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if undo_rng is not None:
            undo_rng()
        raise AdapterFileError(f"{folder}: optimizer state does not fit ({type(exc).__name__}: {exc})") from None
    for key, obj in objects.items():
        if state[key] is not None:
            obj.load_state_dict(state[key])
    model.load_state_dict({k: like_param(v, current[k]) for k, v in trainable.items()}, strict=False)
    return state


def _read_state(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint: a JSON object of bounded size."""
    path = folder / "state.json"
    try:
        size = path.stat().st_size
        if size > _MAX_STATE_BYTES:
            raise AdapterFileError(f"{path}: {size} bytes; a checkpoint's state is at most {_MAX_STATE_BYTES}")
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, AdapterFileError):
            raise
        raise AdapterFileError(f"{folder}: not a complete checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise AdapterFileError(f"{path}: not a JSON object")
    return state
