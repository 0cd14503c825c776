"""Recipes under FSDP (``accelerate launch`` with FSDP version 2): what changes when parameters are sharded.

With FSDP2 every parameter (and its gradient and optimizer state) becomes a DTensor holding
1/N of it on each of N processes. The runners keep files whole: a checkpoint holds full
tensors, gathered by every process and written by the first; a resumed run shards them again
the way the live parameters are sharded; the final adapter and merged checkpoint are written
from a whole copy of the model that the main process keeps, with the trained tensors gathered
into it at the end.

A LoRA layer must stay inside one FSDP unit: its fast path reads the base weight and A, B
together, so a wrap policy that would shard the base layer or an adapter on its own is refused
before anything is sharded (:func:`check_fsdp`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.bnb import bnb_bits
from visionlora.errors import ConfigError, TrainingError
from visionlora.layers import LoraLayer

__all__ = [
    "check_fsdp",
    "clip_grad_norm",
    "full_tensor",
    "is_fsdp",
    "keep_whole",
    "like_param",
    "local_tensor",
    "trained_tensors",
    "whole_model",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support, or older than DTensor's public module
        return None
    return DTensor


def _sharded(tensor: torch.Tensor) -> Any:
    """``tensor`` as a DTensor if it is one, else None."""
    dtensor = _dtensor_type()
    return tensor if dtensor is not None and isinstance(tensor, dtensor) else None


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process if ``tensor`` is sharded (every process must call),
    else ``tensor`` itself."""
    sharded = _sharded(tensor)
    return tensor if sharded is None else sharded.full_tensor()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (all of it when it is not sharded)."""
    sharded = _sharded(tensor)
    return tensor if sharded is None else sharded.to_local()


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``value`` sharded the way ``param`` is (``value`` itself when ``param`` is not sharded)."""
    sharded = _sharded(param)
    if sharded is None or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    # Every process read the same whole tensor: each keeps its part, nothing is sent.
    return distribute_tensor(value.to(param.device), sharded.device_mesh, sharded.placements, src_data_rank=None)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params``, sharded or whole, so that together they have norm at most
    ``max_norm`` (torch's rule: factor max_norm / (norm + 1e-6), at most 1); return their norm before.

    A sharded gradient's norm is reduced over its own mesh and placements; whole gradients are the
    same on every process (already averaged). Every process must call this.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if _sharded(g) is not None]
    whole = [g for g in grads if _sharded(g) is None]
    norms = [full_tensor(torch.nn.utils.get_total_norm(sharded)).float()] if sharded else []
    norms += [torch.nn.utils.get_total_norm(whole).float()] if whole else []
    norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    if factor < 1.0:
        for g in grads:
            g.mul_(factor)
    return norm


def is_fsdp(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards models with FSDP."""
    return bool(accelerator.distributed_type == require("accelerate.utils").DistributedType.FSDP)


def _torch_has_fsdp2_tools() -> bool:
    """True when torch has what the sharded paths use (both arrived by torch 2.7)."""
    import inspect

    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch without distributed support, or before DTensor's public module (2.5)
        return False
    has_src_data_rank = "src_data_rank" in inspect.signature(distribute_tensor).parameters
    return hasattr(torch.nn.utils, "get_total_norm") and has_src_data_rank


def check_fsdp(accelerator: Any, model: nn.Module) -> None:
    """Refuse an FSDP set-up that cannot train ``model``'s LoRA layers, before anything is sharded.

    Raises:
        ConfigError: a bitsandbytes base, torch older than 2.7, FSDP version 1, or a wrap policy that
            would shard a module inside a LoRA layer.
    """
    if not is_fsdp(accelerator):
        return
    held = [n for n, m in model.named_modules() if bnb_bits(m)]
    if held:
        raise ConfigError(
            f"FSDP: {held[0]!r} is a bitsandbytes layer, whose packed weight and quantization state visionlora "
            "does not shard; train it under DDP or in one process, or hold the base in int8 (model.quantize: int8)"
        )
    if not _torch_has_fsdp2_tools():
        raise ConfigError(
            f"FSDP: visionlora needs torch 2.7 or newer under FSDP (torch.nn.utils.get_total_norm and "
            f"distribute_tensor(src_data_rank=)), this is torch {torch.__version__}; upgrade torch or train "
            "without FSDP"
        )
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"FSDP version {plugin.fsdp_version}: visionlora trains under FSDP version 2 only (frozen and "
            "trained parameters side by side need per-parameter sharding); set fsdp_version: 2 in the accelerate "
            "config or pass --fsdp_version 2 to accelerate launch"
        )
    plugin.set_auto_wrap_policy(model)  # what accelerate's prepare does first (a no-op when done already)
    policy = require("accelerate.utils.fsdp_utils").fsdp2_prepare_auto_wrap_policy(plugin, model)
    if policy is None:
        return
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        inner = [(f"{name}.{sub}", m) for sub, m in module.named_modules() if sub and policy(m)]
        if inner:
            largest = max(sum(p.numel() for p in m.parameters()) for sub, m in module.named_modules() if sub)
            raise ConfigError(
                f"FSDP wrap policy: it would shard {inner[0][0]} ({type(inner[0][1]).__name__}) on its own, inside "
                f"the LoRA layer {name}; a LoRA layer must stay in one FSDP unit. Wrap whole blocks "
                "(fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap naming the "
                f"block class) or set fsdp_min_num_params to {largest} or more"
            )


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in ``model``: every parameter that trains and every persistent buffer
    (state-dict names; sharded tensors stay sharded)."""
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    return {k: v.detach() for k, v in state.items() if (id(v) not in params) or getattr(v, "requires_grad", False)}


def keep_whole(accelerator: Any, model: nn.Module) -> nn.Module | None:
    """Under FSDP, a copy of ``model`` on the main process, taken before it is sharded (None elsewhere).

    The run's results are written from it at the end (:func:`whole_model`): FSDP frees a
    parameter's whole tensor again whenever the model is used, so the sharded model itself cannot
    be written. It costs one model's size in CPU memory on the main process.
    """
    if not is_fsdp(accelerator) or not accelerator.is_main_process:
        return None
    return copy.deepcopy(model).cpu()


def whole_model(model: nn.Module, kept: nn.Module | None) -> nn.Module:
    """The trained model, whole: ``model`` itself, or under FSDP ``kept`` (from :func:`keep_whole`) with
    ``model``'s trained tensors gathered into it. Every process must call this; under FSDP only the
    main process gets a model (the others get ``model``, still sharded)."""
    if not any(_sharded(p) is not None for p in model.parameters()):
        return model
    state = trained_tensors(model)
    whole = {k: full_tensor(v).cpu() for k, v in state.items()}  # a collective: in the same order everywhere
    if kept is None:
        return model
    unexpected = kept.load_state_dict(whole, strict=False).unexpected_keys
    if unexpected:  # the kept copy is the model before sharding: the same names, or a bug
        raise TrainingError(f"the sharded model's tensors {unexpected[:5]} have no place in the kept whole copy")
    return kept
