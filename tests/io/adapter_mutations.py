"""Valid adapter files of every format, the ways downloaded files break, and the check they must pass.

Shared by ``tests/io/test_fuzz.py`` (choices drawn by Hypothesis, which shrinks failures),
``scripts/fuzz.py`` (choices drawn by ``random.Random`` for a fixed time) and
``scripts/make_nasty_corpus.py``. Every choice a mutation makes goes through a :class:`Chooser`,
so the same mutators run under both.

The check (:func:`run_case`): ``vl.load_adapter`` on a fresh model and ``visionlora inspect`` on
the mutated file either succeed or raise a visionlora error. After a refused load the model is
bit for bit what it was (state dict, module types, adapters, trainability); after a successful
one every floating tensor of the model is finite.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import nn

import visionlora as vl
from tests.conftest import randomize_lora, tiny_net, tiny_unet
from visionlora.cli import main as cli_main

T = TypeVar("T")

FORMATS = ("visionlora", "peft", "diffusers", "kohya")
FOLDER, LOOP, DANGLING = "<folder>", "<symlink to itself>", "<symlink to nothing>"
"""Stand-ins for file contents that are not bytes: what :func:`materialize` puts there instead."""
Files = dict[str, "bytes | str"]


class Chooser(Protocol):
    """Where a mutation's choices come from."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        ...


class RandomChooser:
    """Choices from a seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class HypothesisChooser:
    """Choices drawn from Hypothesis' ``st.data()``, so failures shrink."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return int(self.data.draw(self.st.integers(lo, hi)))


def choice(ch: Chooser, options: Sequence[T]) -> T:
    return options[ch.integer(0, len(options) - 1)]


# ---------------------------------------------------------------------------------------------
# Models and valid files


class FuzzNet(nn.Module):
    """3x3, grouped 3x3 and 1x1 convs, BatchNorm and a Linear: small, and every layer kind a file can name."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(torch.relu(self.grouped(torch.relu(self.bn(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


@functools.cache
def _template(kind: str) -> nn.Module:
    if kind == "fuzznet":
        torch.manual_seed(0)
        return FuzzNet().eval()
    if kind == "tinynet":
        return tiny_net()
    return tiny_unet()


def fresh_model(kind: str) -> nn.Module:
    """A new copy of the un-adapted model ``kind`` (``fuzznet``, ``tinynet`` or ``unet``)."""
    return copy.deepcopy(_template(kind))


@dataclass(frozen=True)
class Seed:
    """A valid adapter (as the bytes of its files) and the model it loads onto."""

    name: str
    format: str
    model: str
    files: dict[str, bytes]
    entry: str
    """The path ``load_adapter`` is given, relative to the folder the files are written to."""


def _adapted(kind: str, cfg: vl.LoraConfig, *, train_stats: bool = False) -> nn.Module:
    model = vl.apply_lora(fresh_model(kind), cfg)
    randomize_lora(model, seed=1, std=0.2)
    if train_stats:  # BatchNorm statistics change in training and travel with the adapter as buffers
        model.train()
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
        model.eval()
    return model


def _read_tree(root: Path) -> dict[str, bytes]:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {k: canonical(v) if k.endswith(".safetensors") else v for k, v in files.items()}


def _without_record(data: bytes) -> bytes:
    """The safetensors file ``data`` without visionlora's header entry: a file as other tools write it."""
    header = dict(_header(data)[0].get("__metadata__") or {})
    header.pop("visionlora", None)
    return save_bytes(load_bytes(data), metadata=header or None)


def _kohya_tucker(data: bytes) -> bytes:
    """A kohya file from elsewhere: no visionlora record, and the 3x3 stem in LyCORIS' Tucker form."""
    tensors = load_bytes(data)
    down = tensors.pop("lora_unet_stem.lora_down.weight")  # (r, 3, 3, 3)
    rank = down.shape[0]
    tensors["lora_unet_stem.lora_down.weight"] = torch.randn(rank, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    tensors["lora_unet_stem.lora_mid.weight"] = (
        torch.randn(rank, rank, 3, 3, generator=torch.Generator().manual_seed(2)) * 0.3
    )
    return save_bytes(tensors, metadata={"ss_network_module": "lycoris.kohya"})


def _diffusers_with_alpha_keys(data: bytes) -> bytes:
    """A diffusers file as kohya-converted ones look: un-prefixed keys and an ``.alpha`` tensor per layer."""
    tensors = {k.removeprefix("unet."): v for k, v in load_bytes(data).items()}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        tensors[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(tensors[key].shape[0]) * 2)
    return save_bytes(tensors)


@functools.cache
def seeds() -> tuple[Seed, ...]:
    """Valid files of every format (and foreign variants without visionlora's own record)."""
    plain = ["stem", "pw", "fc"]  # layers every format's loaders run exactly as visionlora does
    out: list[Seed] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = _adapted(
            "tinynet",
            vl.LoraConfig(
                targets=["stem", "block.*", "fc"],
                target_types=["Conv2d", "Linear"],
                rank=2,
                alpha=3,
                rank_pattern={"fc": 3},
                bias="lora_only",
                trainable=["bn"],
            ),
            train_stats=True,
        )
        out.append(
            Seed("native-tinynet", "visionlora", "tinynet", {"a.safetensors": _save(tiny, root)}, "a.safetensors")
        )
        shared = _adapted(
            "fuzznet", vl.LoraConfig(targets=["*"], rank=2, alpha=5, alpha_pattern={"fc": 1.5}, conv_groups="shared")
        )
        out.append(
            Seed("native-shared", "visionlora", "fuzznet", {"a.safetensors": _save(shared, root)}, "a.safetensors")
        )

        peft_model = _adapted(
            "fuzznet",
            vl.LoraConfig(targets=plain, rank=2, alpha=4, rank_pattern={"pw": 3}, trainable=["bn"], bias="lora_only"),
            train_stats=True,
        )
        vl.export_adapter(peft_model, root / "peft", format="peft")
        peft = {f"adapter/{k}": v for k, v in _read_tree(root / "peft").items()}
        out.append(Seed("peft", "peft", "fuzznet", peft, "adapter"))
        weights = "adapter/adapter_model.safetensors"
        foreign = {**peft, weights: _without_record(peft[weights])}
        out.append(Seed("peft-foreign", "peft", "fuzznet", foreign, "adapter"))

        lora_only = _adapted("fuzznet", vl.LoraConfig(targets=plain, rank=2, alpha=6, rank_pattern={"fc": 1}))
        diffusers = _export(lora_only, root / "d.safetensors", "diffusers")
        out.append(Seed("diffusers", "diffusers", "fuzznet", {"d.safetensors": diffusers}, "d.safetensors"))
        out.append(
            Seed(
                "diffusers-foreign",
                "diffusers",
                "fuzznet",
                {"d.safetensors": _without_record(diffusers)},
                "d.safetensors",
            )
        )
        alpha_keys = _diffusers_with_alpha_keys(diffusers)
        out.append(Seed("diffusers-alpha", "diffusers", "fuzznet", {"d.safetensors": alpha_keys}, "d.safetensors"))
        kohya = _export(lora_only, root / "k.safetensors", "kohya")
        out.append(Seed("kohya", "kohya", "fuzznet", {"k.safetensors": kohya}, "k.safetensors"))
        out.append(Seed("kohya-tucker", "kohya", "fuzznet", {"k.safetensors": _kohya_tucker(kohya)}, "k.safetensors"))

        families = _adapted(
            "fuzznet",
            vl.LoraConfig(
                targets=plain, rank=2, family="loha", family_pattern={"fc": "dora", "pw": "lokr"}, tucker=True
            ),
        )
        out.append(
            Seed("native-families", "visionlora", "fuzznet", {"a.safetensors": _save(families, root)}, "a.safetensors")
        )
        lycoris = _without_record(_export(families, root / "ly.safetensors", "kohya"))
        out.append(Seed("kohya-lycoris-foreign", "kohya", "fuzznet", {"k.safetensors": lycoris}, "k.safetensors"))
        dora = _adapted("fuzznet", vl.LoraConfig(targets=plain, rank=2, alpha=3, family="dora"))
        vl.export_adapter(dora, root / "peft-dora", format="peft")
        out.append(
            Seed(
                "peft-dora",
                "peft",
                "fuzznet",
                {f"adapter/{k}": v for k, v in _read_tree(root / "peft-dora").items()},
                "adapter",
            )
        )

        unet_cfg = vl.LoraConfig(targets=["*attn1.to_q", "*attn2.to_k", "down_blocks.0.resnets.0.conv1"], rank=2)
        unet = _adapted("unet", unet_cfg)
        unet_diffusers = _export(unet, root / "ud.safetensors", "diffusers")
        out.append(Seed("diffusers-unet", "diffusers", "unet", {"u.safetensors": unet_diffusers}, "u.safetensors"))
        unet_kohya = _without_record(_export(unet, root / "uk.safetensors", "kohya"))
        out.append(Seed("kohya-unet-foreign", "kohya", "unet", {"u.safetensors": unet_kohya}, "u.safetensors"))
    return tuple(out)


def _save(model: nn.Module, root: Path) -> bytes:
    return canonical(vl.save_adapter(model, Path(tempfile.mkdtemp(dir=root)) / "native.safetensors").read_bytes())


def _export(model: nn.Module, path: Path, format: str) -> bytes:
    return canonical(vl.export_adapter(model, path, format=format).read_bytes())  # type: ignore[arg-type]


def seeds_of(format: str) -> list[Seed]:
    return [s for s in seeds() if s.format == format]


# ---------------------------------------------------------------------------------------------
# Random JSON and the values that break readers


SPECIAL_NUMBERS: tuple[Any, ...] = (
    0, 1, -1, 2, 2**20, 2**20 + 1, 2**31, 2**63, 2**64 + 1, 10**400, 0.0, -0.0, 0.5, -1.5, 1e-320, 1e-300,
    1e38, 1e308, math.nan, math.inf, -math.inf, True, False, None, "4", "8.0", [4], {"r": 4},
)  # fmt: skip
STRINGS: tuple[str, ...] = (
    "", "x", "0", "-1", "9" * 5000, "LORA", "Conv2d", "Linear", "Conv3d", "default", "training", "fc", "stem",
    "\ud800", "re:(", "re:" + "(" * 3000 + ")" * 3000, "a{99999999999}", "zeros", "per_group", "lora_only",
    "visionlora.adapter", "visionlora.export", "../../etc/passwd", "lora_unet_fc", "unet.fc", "(.|..)*x",
    ".*.*.*.*.*x", "shared", "reflect", "fc.weight", "fc.bias", "bn.running_mean", "bn.num_batches_tracked",
    "stem.weight", "stem.lora_A.weight", "block.2", "grouped",
)  # fmt: skip
MODULE_NAMES: tuple[str, ...] = (
    "stem", "bn", "grouped", "pw", "fc", "block", "block.0", "block.1", "block.2", "pool", "", ".", "fc.",
    "fc.base", "fc.adapters.first", "stem.weight", "conv_in", "time_embedding.linear_1",
    "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.0.resnets.0.norm1",
)  # fmt: skip
"""Module names of the seed models (adaptable or not, LoRA wrappers' insides) and names that are none."""


def random_json(ch: Chooser, depth: int = 0) -> Any:
    """A JSON value, mostly the scalars that break parsers, sometimes a small nested list or object."""
    kind = ch.integer(0, 9 if depth < 3 else 5)
    if kind <= 3:
        return choice(ch, SPECIAL_NUMBERS)
    if kind <= 5:
        return choice(ch, STRINGS)
    if kind <= 7:
        return [random_json(ch, depth + 1) for _ in range(ch.integer(0, 3))]
    return {choice(ch, STRINGS): random_json(ch, depth + 1) for _ in range(ch.integer(0, 3))}


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            paths += _json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            paths += _json_paths(v, (*prefix, i))
    return paths


def mutate_json(value: Any, ch: Chooser) -> tuple[Any, str]:
    """``value`` with one node replaced, tweaked, deleted or added to; and what was done."""
    value = copy.deepcopy(value)
    path = choice(ch, _json_paths(value))
    op = ch.integer(0, 4)
    if not path:
        return random_json(ch), "replaced the whole document"
    parent = value
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    old = parent[key]
    if op == 0:
        parent[key] = random_json(ch)
    elif op == 1 and _number(old):  # a rank or alpha nudged just past what is valid
        parent[key] = choice(ch, (old + 1, old - 1, old * 2, -old, old * 1e6, str(old), float(old)))
    elif op == 2:
        del parent[key]
        return value, f"deleted {list(path)}"
    elif op == 3 and isinstance(old, dict):
        old[choice(ch, STRINGS)] = random_json(ch)
    else:
        parent[key] = choice(ch, SPECIAL_NUMBERS)
    return value, f"set {list(path)} = {_short(parent[key])}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1e15 < value < 1e15


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def dump_json(value: Any) -> str:
    """JSON as Python writes it (NaN and Infinity included, as readers that use Python's json accept)."""
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Mutations of safetensors files and PEFT configs


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The parsed header and the data bytes of a safetensors file (raises on a broken one)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _with_header(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data stays 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + body


def canonical(data: bytes) -> bytes:
    """A safetensors file with its header keys sorted.

    safetensors writes metadata in a hash order that changes from process to process; the
    fuzzer's choices depend on the bytes (where a header ends, say), so Hypothesis could not
    replay an example in another process, or even after another save in the same one.
    """
    return _with_header(*_header(data))


def load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load``, sorted by name (safetensors returns its tensors in hash order)."""
    return dict(sorted(_safetensors_load(data).items()))


def save_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with a canonical header (see :func:`canonical`)."""
    return canonical(_safetensors_save(tensors, metadata=metadata))


def flip_bytes(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    """A few bytes XORed, in the header or in the tensor data."""
    if not data:
        return data, "nothing to flip"
    out = bytearray(data)
    header_end = min(len(data), 8 + int.from_bytes(data[:8].ljust(8, b"\0"), "little"))
    where = ch.integer(0, 1)
    lo, hi = (0, header_end - 1) if where == 0 or header_end >= len(data) else (header_end, len(data) - 1)
    done = []
    for _ in range(ch.integer(1, 4)):
        pos = ch.integer(lo, hi)
        out[pos] ^= ch.integer(1, 255)
        done.append(pos)
    return bytes(out), f"flipped bytes at {done}"


def truncate(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    cut = ch.integer(0, max(0, len(data) - 1))
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


_DTYPE_NAMES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "C64", "U64", "F8_E4M3", "XX")


def edit_raw_header(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    """The header JSON changed under the same data: shapes, dtypes and offsets that lie, entries gone or doubled."""
    try:
        header, body = _header(data)
    except (struct.error, ValueError):
        return flip_bytes(data, ch)
    names = [k for k in header if k != "__metadata__"]
    op = ch.integer(0, 5)
    if op == 5 or not names:
        length = len(data) - 8 - len(body)
        lie = choice(ch, (0, length - 1, length + 1, len(data), 2**40, 2**64 - 1))
        return struct.pack("<Q", lie) + data[8:], f"header length {length} -> {lie}"
    name = choice(ch, names)
    entry = header[name]
    if op == 0:
        entry["shape"] = [choice(ch, (0, 1, 2, 3, 4, 8, 2**31, 2**62)) for _ in range(ch.integer(0, 4))]
    elif op == 1:
        entry["dtype"] = choice(ch, _DTYPE_NAMES)
        # Sometimes keep the byte size consistent, so the lie survives safetensors' own checks.
        if ch.integer(0, 1) and entry["dtype"] in ("F16", "BF16", "I32", "F64") and entry["shape"]:
            factor = {"F16": 2, "BF16": 2, "I32": 1, "F64": 0.5}[entry["dtype"]]
            entry["shape"] = [*entry["shape"][:-1], int(entry["shape"][-1] * factor)]
    elif op == 2:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = choice(ch, ([end, start], [start, end + 4], [0, end - start], [start + 1, end + 1]))
    elif op == 3:
        del header[name]
    else:
        header[choice(ch, STRINGS) or "y"] = dict(entry)
    return _with_header(header, body), f"header entry {name!r}: op {op}"


def _tensor_edit(tensors: dict[str, torch.Tensor], ch: Chooser) -> str:
    if not tensors:
        tensors["x"] = torch.zeros(1)
        return "added a tensor"
    key = choice(ch, sorted(tensors))
    t = tensors[key]
    op = ch.integer(0, 12)
    if op == 0:
        del tensors[key]
        return f"deleted {key}"
    if op == 1:
        swaps = (("lora_A", "lora_B"), ("lora_down", "lora_up"), ("lora_B", "lora_A"), ("lora_up", "lora_mid"))
        new = key
        for a, b in swaps:
            if a in key:
                new = key.replace(a, b)
                break
        new = choice(
            ch, (new, key + "x", "x" + key, key.replace(".", "_"), key.rpartition(".")[0], choice(ch, STRINGS))
        )
        tensors[new] = tensors.pop(key)
        return f"renamed {key} -> {new!r}"
    if op == 2:
        other = choice(ch, sorted(tensors))
        tensors[key] = tensors[other].clone()
        return f"{key} replaced by a copy of {other}"
    if op == 3:
        dtype = choice(
            ch,
            (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.int8,
             torch.bool, torch.complex64, torch.float8_e4m3fn, torch.uint64),
        )  # fmt: skip
        tensors[key] = t.to(dtype)
        return f"{key} cast to {dtype}"
    if op == 4 and t.ndim >= 2:
        tensors[key] = t.transpose(0, 1).contiguous()
        return f"{key} transposed"
    if op == 5:
        shape = tuple(choice(ch, (0, 1, 2, 3, 4, 8, 9)) for _ in range(ch.integer(0, 5)))
        tensors[key] = torch.full(shape, 0.25)
        return f"{key} replaced by shape {shape}"
    if op == 6 and t.numel():
        flat = t.clone().reshape(-1)
        value = choice(ch, (math.nan, math.inf, -math.inf))
        if flat.is_floating_point():
            flat[ch.integer(0, flat.numel() - 1)] = value
        tensors[key] = flat.reshape(t.shape)
        return f"{key}: one value set to {value}"
    if op == 7:  # finite in float64, infinite in the float32 or float16 the model holds
        tensors[key] = torch.full(t.shape, choice(ch, (1e300, -1e300, 1e39, 7e4)), dtype=torch.float64)
        return f"{key}: huge float64 values"
    if op == 8 and t.numel():
        tensors[key] = t.reshape(-1)
        return f"{key} flattened"
    if op == 9:
        tensors[key] = t.unsqueeze(ch.integer(0, t.ndim))
        return f"{key} unsqueezed"
    if op == 10 and t.ndim and t.shape[0] > 1:
        tensors[key] = t[: t.shape[0] - 1].contiguous()
        return f"{key} lost a row (rank no longer matches)"
    if op == 11:
        tensors[key] = torch.tensor(
            choice(ch, (0.0, -1.0, 1e-45, 1e38, math.nan, 3.0)),
            dtype=t.dtype if t.is_floating_point() else torch.float32,
        )
        return f"{key} replaced by a scalar"
    tensors[choice(ch, STRINGS) or "y"] = t.clone()
    return f"{key} duplicated under another name"


def edit_tensors(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    """A valid safetensors file again, with tensors deleted, renamed, recast, reshaped or poisoned."""
    try:
        tensors = dict(load_bytes(data))
        metadata = _header(data)[0].get("__metadata__")
    except Exception:  # already broken by an earlier mutation
        return flip_bytes(data, ch)
    done = [_tensor_edit(tensors, ch) for _ in range(ch.integer(1, 2))]
    try:
        return save_bytes(tensors, metadata=metadata), "; ".join(done)
    except Exception:  # a dtype safetensors cannot write: try the bytes instead
        return flip_bytes(data, ch)


def edit_metadata(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    """A header metadata entry (the visionlora record, diffusers' or kohya's) edited, dropped or replaced."""
    try:
        tensors = dict(load_bytes(data))
        metadata = dict(_header(data)[0].get("__metadata__") or {})
    except Exception:
        return flip_bytes(data, ch)
    keys = sorted(metadata) or ["visionlora"]
    key = choice(ch, [*keys, "visionlora", "lora_adapter_metadata"])
    op = ch.integer(0, 4)
    raw = metadata.get(key)
    if op <= 2 and raw is not None:
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = raw
        for _ in range(op + 1):
            value, did = mutate_json(value, ch)
        metadata[key] = dump_json(value)
        what = f"metadata {key!r}: {did}"
    elif op == 3:
        metadata.pop(key, None)
        what = f"metadata {key!r} removed"
    else:
        metadata[key] = choice(
            ch, (choice(ch, STRINGS), "[" * 2000, '{"format": "visionlora.adapter", "format_version": 1}', "null")
        )
        what = f"metadata {key!r} replaced"
    try:
        return save_bytes(tensors, metadata=metadata or None), what
    except Exception:  # a value safetensors cannot write (a lone surrogate): try the bytes instead
        return flip_bytes(data, ch)


_PREFIXES = ("base_model.model.", "unet.", "lora_unet_", "")
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha")


def _split_key(key: str) -> tuple[str, str, str]:
    """(prefix, module, suffix) of a LoRA tensor key in any format; the suffix may be empty."""
    prefix = next(p for p in _PREFIXES if key.startswith(p))
    rest = key[len(prefix) :]
    suffix = next((x for x in _SUFFIXES if rest.endswith(x)), "")
    return prefix, rest[: len(rest) - len(suffix)], suffix


def rename_module(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    """One module's keys (and its name in the header) moved to another module, or to a name that is none."""
    try:
        tensors = dict(load_bytes(data))
        metadata = dict(_header(data)[0].get("__metadata__") or {})
    except Exception:
        return flip_bytes(data, ch)
    modules = sorted({_split_key(k)[1] for k in tensors if _split_key(k)[2]})
    if not modules:
        return flip_bytes(data, ch)
    old, new = choice(ch, modules), choice(ch, MODULE_NAMES)
    renamed = {}
    for key, tensor in tensors.items():
        prefix, module, suffix = _split_key(key)
        flat = prefix == "lora_unet_"
        if module == old and suffix:
            key = prefix + (new.replace(".", "_") if flat else new) + suffix
        renamed[key] = tensor
    dotted = old.replace("_", ".") if old not in metadata.get("visionlora", "") else old
    metadata = {k: v.replace(f'"{dotted}"', json.dumps(new)) for k, v in metadata.items()}
    try:
        return save_bytes(renamed, metadata=metadata or None), f"module {old!r} renamed to {new!r}"
    except Exception:  # two keys became one
        return flip_bytes(data, ch)


def edit_config(data: bytes, ch: Chooser) -> tuple[bytes, str]:
    """A PEFT ``adapter_config.json`` edited, or replaced by something that is not a config."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        return flip_bytes(data, ch)
    if ch.integer(0, 5) == 0:
        text = choice(ch, ("[]", "null", '"LORA"', "[" * 5000, "{" * 10, "\xff\xfe", '{"peft_type": "LORA"}'))
        return text.encode("utf-8", "surrogateescape"), "config replaced"
    targeted = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "lora_dropout", "use_rslora", "bias",
                "modules_to_save", "peft_type", "use_dora", "target_modules")  # fmt: skip
    if isinstance(config, dict) and ch.integer(0, 1):
        key = choice(ch, targeted)
        config[key] = random_json(ch) if ch.integer(0, 1) else choice(ch, SPECIAL_NUMBERS)
        return dump_json(config).encode(), f"config {key} = {_short(config[key])}"
    config, did = mutate_json(config, ch)
    return dump_json(config).encode(), f"config: {did}"


_BYTE_OPS: dict[str, Callable[[bytes, Chooser], tuple[bytes, str]]] = {
    "flip": flip_bytes,
    "truncate": truncate,
    "raw header": edit_raw_header,
    "tensors": edit_tensors,
    "metadata": edit_metadata,
    "rename": rename_module,
}
_WEIGHTS = (
    "flip",
    "truncate",
    "raw header",
    "tensors",
    "tensors",
    "tensors",
    "metadata",
    "metadata",
    "metadata",
    "rename",
    "rename",
)


def mutate(seed: Seed, ch: Chooser) -> tuple[Files, list[str]]:
    """One to three mutations of ``seed``'s files; returns the new files and what was done."""
    files: Files = dict(seed.files)
    log = []
    for _ in range(ch.integer(1, 3)):
        name = choice(ch, sorted(files))
        content = files[name]
        if ch.integer(0, 30) == 0:  # the file is not a file at all
            files[name] = choice(ch, (FOLDER, LOOP, DANGLING, b""))
            log.append(f"{name}: replaced by {files[name]!r}")
            continue
        if not isinstance(content, bytes):
            continue
        if name.endswith(".json"):
            files[name], did = edit_config(content, ch)
        else:
            files[name], did = _BYTE_OPS[choice(ch, _WEIGHTS)](content, ch)
        log.append(f"{name}: {did}")
    return files, log


# ---------------------------------------------------------------------------------------------
# Writing files out and the check every case must pass


def materialize(files: Files, root: Path) -> None:
    """Write ``files`` under ``root`` (folders and broken symlinks for the stand-ins)."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == FOLDER:
            path.mkdir()
        elif content == LOOP:
            os.symlink(path.name, path)
        elif content == DANGLING:
            os.symlink(path.name + ".missing", path)
        else:
            assert isinstance(content, bytes)
            path.write_bytes(content)


def snapshot(model: nn.Module) -> tuple[Any, ...]:
    """Everything a refused load must leave as it was."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    return state, grads, types, vl.list_adapters(model), vl.active_adapters(model)


def same(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    """Bit for bit: the same tensors (dtype, shape, values) and the same structure, adapters and trainability."""
    (s1, *rest1), (s2, *rest2) = before, after
    if list(s1) != list(s2) or rest1 != rest2:
        return False
    return all(s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in s1)


class FuzzFailure(AssertionError):
    """An invariant broke: the model changed on a refused load, or took non-finite values on a successful one."""


def run_inspect(path: Path) -> int:
    """``visionlora inspect path`` with a strict UTF-8 stdout (as a terminal), returning its exit status."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(["inspect", str(path)])
        out.flush()
        err.flush()
    return status


def run_case(seed: Seed, files: Files, workdir: Path, *, preload: bool = False) -> str:
    """Load the mutated ``files`` and inspect them; ``"loaded"`` or ``"refused"``, else raise.

    With ``preload`` the model already holds the unmutated seed (under another name), so a refusal
    must also leave existing LoRA layers exactly as they were.

    Raises:
        FuzzFailure: an invariant broke.
        Exception: anything else load_adapter or inspect raised that is not a visionlora error.
    """
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        materialize(files, root)
        path = root / seed.entry
        status = run_inspect(path)
        if status not in (0, 2):
            raise FuzzFailure(f"inspect returned {status}")
        model = fresh_model(seed.model)
        name = None
        if preload:
            original = root.parent / f"{root.name}-original"
            materialize(dict(seed.files), original)
            vl.load_adapter(model, original / seed.entry, adapter_name="first")
            name = "second"
        before = snapshot(model)
        try:
            vl.load_adapter(model, path, adapter_name=name)
        except vl.VisionLoraError as exc:
            if not same(before, snapshot(model)):
                raise FuzzFailure(f"the model changed although the load was refused: {exc}") from None
            if str(path) not in str(exc) and seed.entry not in str(exc):
                raise FuzzFailure(f"the error does not name the file: {exc}") from None
            return "refused"
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FuzzFailure(f"loaded, and the model now holds NaN/Inf in {bad[:5]}")
        return "loaded"
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.parent / f"{root.name}-original", ignore_errors=True)
