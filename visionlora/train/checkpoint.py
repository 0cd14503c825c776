"""Resumable training checkpoints: safetensors + JSON only, written atomically, pruned to the newest N.

A checkpoint folder ``checkpoints/step-000120/`` holds:

- ``trainable.safetensors``: every parameter that trains and every persistent buffer;
- ``optimizer.safetensors``: the optimizer's state tensors, with its param groups in the header;
- ``rng-<rank>.safetensors``: each process's torch (and CUDA) RNG state, Python's and NumPy's in the header;
- ``state.json``: step, epoch, position in the epoch, LR scheduler and grad-scaler state, history.

The folder is assembled under a temporary name and renamed into place when complete, so a run
killed at any moment leaves the previous checkpoints intact and resumes from the newest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.errors import AdapterFileError, ConfigError
from visionlora.io.files import read_safetensors, write_safetensors, write_text

__all__ = ["checkpoint_dirs", "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "save_checkpoint"]

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


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
    found = checkpoint_dirs(root)
    ours = [p for p in found if int(p.name.split("-")[1]) <= current]
    for old in [p for p in found if p not in ours] + ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    return {k: v.detach() for k, v in state.items() if (id(v) not in params) or getattr(v, "requires_grad", False)}


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


def _set_rng_state(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json.loads(header["python"])
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in tensors:
        import numpy as np

        name, pos, has_gauss, cached = json.loads(header["numpy"])
        np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}


def _set_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], header: dict[str, str]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(header["scalars"]).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["param_groups"])})


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
    """
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
        write_safetensors(tmp / "trainable.safetensors", _trainable_state(model), {"format": "pt"})
        opt_tensors, opt_header = _optimizer_state(optimizer)
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors, opt_header)
        write_text(tmp / "state.json", json.dumps({**state, "world_size": world_size}, indent=1))
        if final.exists():  # the same step written again (a resumed run): swap, then remove the old one
            old = root / f".old-step-{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    wait()
    return final


def load_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> dict[str, Any]:
    """Restore model tensors, optimizer and this process's RNG from ``folder``; return its ``state.json``.

    Everything is read and checked before the model or optimizer change.

    Raises:
        AdapterFileError: the folder is incomplete, or its tensors do not fit the model.
    """
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{folder}: not a complete checkpoint ({exc})") from None
    trainable, _ = read_safetensors(folder / "trainable.safetensors")
    opt_tensors, opt_header = read_safetensors(folder / "optimizer.safetensors")
    rng_file = folder / f"rng-{rank}.safetensors"
    rng = read_safetensors(rng_file) if rng_file.is_file() else None
    current = model.state_dict()
    bad = sorted(k for k, v in trainable.items() if k not in current or current[k].shape != v.shape)
    missing = sorted(k for k in _trainable_state(model) if k not in trainable)
    if bad or missing:
        raise AdapterFileError(
            f"{folder}: does not fit this run's model: unknown or reshaped {bad[:10]}, missing {missing[:10]}"
        )
    model.load_state_dict(trainable, strict=False)
    _set_optimizer_state(optimizer, opt_tensors, opt_header)
    if rng is not None:
        _set_rng_state(*rng)
    return dict(state)
