"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written so that ``peft.PeftModel.from_pretrained(base, folder)`` rebuilds the same adapter:
``target_modules`` is a regex that fully matches exactly the adapted modules, ranks and alphas that
differ from the most common ones go in ``rank_pattern`` / ``alpha_pattern`` under anchored keys
(``^layer4\\.0\\.conv1$``, so ``conv1`` does not also match ``layer1.0.conv1``), trained biases of
adapted layers go under ``<module>.base_layer.bias`` with ``bias="lora_only"``, and every other
trained or changed tensor (a new head, BatchNorm running statistics) is saved through
``modules_to_save`` of the module that holds it. PEFT selects those by suffix (``bn1`` also wraps
``layer1.0.bn1``) and expects every selected module's tensors, so those are saved too, with their
current values. peft itself is never imported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from visionlora.io.adapter import AdapterFile, Parts, Payload, Source, cast_tensors, file_error
from visionlora.io.convert import (
    COMPONENTS,
    anchored,
    check_patterns,
    exact_regex,
    export_header,
    foreign_record,
    kept_record,
    most_common,
    pattern_value,
    require_exportable,
    unmappable,
)
from visionlora.io.files import read_safetensors

__all__ = [
    "CONFIG_FILE",
    "PEFT_MAGNITUDE",
    "WEIGHTS_FILE",
    "peft_dora",
    "peft_magnitude",
    "peft_tensors",
    "read_peft",
    "record_magnitude",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 4 * 1024 * 1024  # PEFT writes a few KB; rank_pattern for every layer of a UNet is ~100 KB
# Config entries whose non-default values change what the adapter computes in ways visionlora cannot.
_UNSUPPORTED = {
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
}


PEFT_MAGNITUDE = "lora_magnitude_vector"
"""PEFT's (and diffusers') name of a DoRA layer's magnitude: ``(out,)`` on a Linear, ``(1, out, 1, …)`` on a conv."""


def peft_magnitude(magnitude: torch.Tensor) -> torch.Tensor:
    """A record's magnitude ``(out, 1, …)`` in PEFT's shape."""
    return magnitude.reshape(-1) if magnitude.ndim == 2 else magnitude.reshape(1, -1, *magnitude.shape[2:])


def record_magnitude(magnitude: torch.Tensor, ndim: int) -> torch.Tensor:
    """PEFT's magnitude of a layer whose A has ``ndim`` dimensions in the record's shape ``(out, 1, …)``."""
    return magnitude.reshape(-1, *([1] * (ndim - 1)))


def peft_dora(file: AdapterFile, format_name: str) -> bool:
    """Whether ``file`` is DoRA in PEFT's sense (every layer; magnitude per output channel), False for plain
    LoRA; refuses a mix, which PEFT's one ``use_dora`` cannot express, and per-input-channel magnitudes."""
    dora = sorted(n for n, spec in file.layers.items() if spec.family == "dora")
    if dora and len(dora) != len(file.layers):
        plain = sorted(set(file.layers) - set(dora))
        raise file_error(
            file.path,
            f"mixes DoRA ({dora[0]!r}, ...) and LoRA ({plain[0]!r}, ...) layers; {format_name}'s use_dora is one "
            "setting for every layer of a model (export to 'kohya' or keep the visionlora file)",
        )
    for name in dora:
        m, b = file.tensors[f"{name}.magnitude"], file.tensors[f"{name}.lora_B.weight"]
        if m.shape[0] != b.shape[0] or any(s != 1 for s in m.shape[1:]):
            raise file_error(
                file.path,
                f"{name}: DoRA magnitude {tuple(m.shape)} is per input channel (LyCORIS' wd_on_out=False); "
                f"{format_name}'s DoRA is per output channel (export to 'kohya')",
            )
    return bool(dora)


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def peft_tensors(parts: Parts) -> Payload:
    """``parts``' one record as a PEFT adapter folder: ``adapter_model.safetensors`` and ``adapter_config.json``.

    ``parts.model_state`` is the model's state dict (un-adapted names): PEFT saves and expects
    every tensor of a ``modules_to_save`` module, so an adapter that trains or changes non-LoRA
    tensors can only be exported with it (i.e. from the model, not from a file).

    Raises:
        AdapterFileError: a layer PEFT would run differently (grouped, dilated, non-zero padding
            mode, custom forward), or a trained tensor PEFT cannot place; each is named.
    """
    (file,) = parts.records.values()
    model_state = parts.model_state
    require_exportable(file, "PEFT", lora_only=False)
    dora = peft_dora(file, "PEFT")
    tensors: dict[str, torch.Tensor] = {}
    for name in file.layers:
        for ab in "AB":
            tensors[f"{_PREFIX}{name}.lora_{ab}.weight"] = file.tensors[f"{name}.lora_{ab}.weight"]
        if dora:
            tensors[f"{_PREFIX}{name}.{PEFT_MAGNITUDE}"] = peft_magnitude(file.tensors[f"{name}.magnitude"])
    lora_biases, owners = [], set()
    for key in file.extra + file.buffers:
        owner = _owner(key)
        if owner in file.layers:
            if not key.endswith(".bias") or key in file.buffers:
                raise file_error(file.path, f"{key}: PEFT cannot save a trained {key} of an adapted layer")
            lora_biases.append(key)
            tensors[f"{_PREFIX}{owner}.base_layer.bias"] = file.tensors[key]
        elif not owner:
            raise file_error(file.path, f"{key}: a tensor of the model itself; PEFT saves only submodules in full")
        else:
            inside = [n for n in file.layers if n.startswith(f"{owner}.")]
            if inside:
                problem = f"{key}: module {owner!r} trains in full but holds LoRA layers {inside[:3]}"
                raise file_error(file.path, problem)
            owners.add(owner)
    # The outermost modules only: PEFT saves a module in full, children included, and refuses nesting.
    to_save = {o for o in owners if not any(o.startswith(f"{p}.") for p in owners)}
    if to_save and model_state is None:
        raise file_error(
            file.path,
            f"PEFT saves whole modules for modules_to_save, and this file holds only the trained tensors of "
            f"{sorted(to_save)[:5]}; load it onto its model (vl.load_adapter) and export the model",
        )
    # PEFT wraps every module whose name ends with a modules_to_save entry and expects all of its
    # tensors in the file: save each one's current values (unchanged ones keep the outputs exact).
    names = {key.rsplit(".", i)[0] for key in model_state or {} for i in range(1, key.count(".") + 1)}
    selected = {n for n in names if any(n.endswith(owner) for owner in to_save)} | to_save
    for name in sorted(selected):
        lora = [m for m in file.layers if name == m or name.startswith(f"{m}.") or m.startswith(f"{name}.")]
        nested = [o for o in selected if o.startswith(f"{name}.")]
        if lora or nested:
            owner = next((o for o in sorted(to_save) if name.endswith(o)), name)
            clash = f"holds or sits in LoRA layers {lora[:3]}" if lora else f"contains {nested[:3]}"
            raise file_error(
                file.path,
                f"PEFT matches modules_to_save by suffix: {owner!r} would also select {name!r}, which {clash}; "
                "this adapter cannot be exported to PEFT exactly",
            )
    for key, tensor in (model_state or {}).items():
        if any(key.startswith(f"{name}.") for name in selected):
            tensors[f"{_PREFIX}{key}"] = tensor
    ranks = {n: s.rank for n, s in file.layers.items()}
    alphas = {n: s.alpha for n, s in file.layers.items()}
    rank, alpha = most_common(ranks.values()), most_common(alphas.values())
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {anchored(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {anchored(n): a for n, a in alphas.items() if a != alpha},
        "target_modules": exact_regex(file.layers),
        "lora_dropout": file.config.dropout,
        "use_rslora": file.config.rslora,
        "bias": "lora_only" if lora_biases else "none",
        "modules_to_save": sorted(to_save) or None,
        "init_lora_weights": True,
        **_UNSUPPORTED,
        "use_dora": dora,
    }
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    header = {"format": "pt", **export_header(file)}
    return Payload(cast_tensors(tensors, parts.dtype), header, {CONFIG_FILE: config_text})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """The adapter_config.json entries visionlora reads have the types PEFT writes."""
    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "lora_alpha": _number,
        "rank_pattern": lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
        "alpha_pattern": lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
        "lora_dropout": lambda v: _number(v) and 0 <= v < 1,
        "use_rslora": lambda v: isinstance(v, bool),
        "use_dora": lambda v: isinstance(v, bool),
        "bias": lambda v: v in ("none", "all", "lora_only"),
        "modules_to_save": lambda v: v is None or (isinstance(v, list) and all(isinstance(m, str) and m for m in v)),
    }
    bad = [f"{k}={config[k]!r}" for k, ok in checks.items() if k in config and not ok(config[k])]
    if bad:
        raise file_error(path, f"entries with values PEFT does not write: {', '.join(bad)}")
    for key in ("rank_pattern", "alpha_pattern"):
        check_patterns(path, config.get(key) or {}, key)


def _without_component(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without a pipeline component's prefix when every key has the same one
    (``transformer.base_model.model.``, as some trainers save a PEFT folder of a pipeline's part)."""
    first = next(iter(raw), "").split(".", 1)[0]
    if first in COMPONENTS and all(k.startswith(f"{first}.{_PREFIX}") for k in raw):
        return {k[len(first) + 1 :]: v for k, v in raw.items()}
    return raw


def read_peft(source: Source, component: str = "unet") -> AdapterFile:
    """Read a PEFT LoRA adapter folder into a record (names as in the base model; one model: no ``component``).

    Raises:
        AdapterFileError: not a LoRA adapter, a feature visionlora does not reproduce (lora_bias,
            ...), a pickled ``adapter_model.bin``, or keys that cannot be mapped. DoRA (``use_dora``) is read.
    """
    folder = source.path
    size = (folder / CONFIG_FILE).stat().st_size
    if size > _MAX_CONFIG_BYTES:
        raise file_error(folder / CONFIG_FILE, f"is {size} bytes; an adapter config is at most {_MAX_CONFIG_BYTES}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise file_error(folder / CONFIG_FILE, f"not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise file_error(folder, f"peft_type is {found!r}; visionlora reads LoRA adapters ('LORA') only")
    used = [k for k, default in _UNSUPPORTED.items() if config.get(k, default) not in (default, [], {})]
    if used:
        raise file_error(folder, f"uses PEFT options visionlora does not reproduce: {used}")
    _check_config(folder / CONFIG_FILE, config)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        hint = f"; {pickled.name} is a pickle, which visionlora never loads (re-save it with safetensors)"
        raise file_error(folder, f"no {WEIGHTS_FILE}" + (hint if pickled.exists() else ""))
    raw, header = read_safetensors(weights)
    raw = _without_component(raw)
    outside = [k for k in raw if not k.startswith(_PREFIX)]
    unmappable(weights, outside, "model", f" (PEFT keys start with {_PREFIX!r})")
    tensors: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    extra, bad = [], []
    for key, tensor in raw.items():
        name = key[len(_PREFIX) :]
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            tensors[name] = tensor
        elif name.endswith(f".{PEFT_MAGNITUDE}") and config.get("use_dora") is True:
            magnitudes[name.removesuffix(f".{PEFT_MAGNITUDE}")] = tensor
        elif ".lora_" in name or PEFT_MAGNITUDE in name:
            bad.append(key)
        else:
            name = name.replace(".base_layer.", ".")
            tensors[name] = tensor
            extra.append(name)
    unmappable(weights, bad, "visionlora LoRA layer", " (embedding LoRA and LoRA biases are not supported)")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    names = {k.rsplit(".lora_", 1)[0] for k in tensors if k.endswith(".lora_A.weight")}
    if config.get("use_dora") is True:
        missing = sorted(names - set(magnitudes))
        unmappable(weights, [f"{_PREFIX}{n}.{PEFT_MAGNITUDE}" for n in set(magnitudes) - names], "DoRA layer")
        if missing:
            raise file_error(weights, f"use_dora is set but layers {missing[:5]} have no {PEFT_MAGNITUDE}")
        for name, magnitude in magnitudes.items():
            tensors[f"{name}.magnitude"] = record_magnitude(magnitude, tensors[f"{name}.lora_A.weight"].ndim)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    file = foreign_record(
        weights,
        "peft",
        tensors,
        {n: pattern_value(alpha_pattern, n, alpha) for n in names},
        extra=extra,
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0)),
        bias=str(config.get("bias", "none")),
        trainable=["re:.*" + re.escape(m) for m in config.get("modules_to_save") or []],
        origins={n: _PREFIX + n for n in names},
    )
    for name, spec in sorted(file.layers.items()):  # shapes are checked by now: A's first dimension is the rank
        declared = pattern_value(rank_pattern, name, rank)
        if type(declared) is not int or declared != spec.rank:
            raise file_error(
                weights, f"layer {name!r}: the config gives rank {declared!r}, the tensors rank {spec.rank}"
            )
    return kept_record(file, header)
