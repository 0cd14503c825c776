"""Write the corpus of nasty adapter files under ``tests/data/nasty/`` (each a few KB at most).

Every entry starts from a small valid file of the FuzzNet model (see ``tests/io/adapter_mutations.py``)
and breaks it in one way that downloaded files break: truncation, headers that lie about sizes,
shapes, dtypes or ranks, NaN/Inf, integer and complex tensors, absurd ranks and alphas, JSON bombs,
regexes that would take hours to match, PEFT configs of the wrong shape, and pickles (named
``.safetensors``, as PEFT's ``adapter_model.bin``, and as a ``torch.save`` ``.pt``) whose
``__reduce__`` writes the file named by ``$VISIONLORA_TEST_MARKER`` if anything ever unpickles them.
Several entries are the inputs that crashed visionlora before it was fixed (marked "regression").

``manifest.json`` lists, per entry, the path given to ``load_adapter``, a regex the load error must
match, and the one ``visionlora inspect`` must match (null where the file is well-formed and only
its fit to the model is wrong, which inspect does not check). ``tests/io/test_nasty_corpus.py``
runs them all. Regenerate (deterministic) with::

    python scripts/make_nasty_corpus.py
"""

from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.io.adapter_mutations import load_bytes, save_bytes, seeds

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "nasty"
MARKER_CODE = "import os\nopen(os.environ['VISIONLORA_TEST_MARKER'], 'w').write('unpickled')\n"


class WritesMarker:
    """Unpickling this runs code: it writes the file named by ``$VISIONLORA_TEST_MARKER``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (MARKER_CODE,))


def _seed(name: str) -> dict[str, bytes]:
    return dict(next(s for s in seeds() if s.name == name).files)


def _header(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def _metadata(data: bytes) -> dict[str, str]:
    return dict(_header(data).get("__metadata__") or {})


def _retensor(data: bytes, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    tensors = dict(load_bytes(data))
    change(tensors)
    return save_bytes(tensors, metadata=_metadata(data) or None)


def _remeta(data: bytes, key: str, change: Callable[[Any], Any] | str) -> bytes:
    """``data`` with header entry ``key`` replaced by ``change(old JSON)`` (dumped) or by raw text."""
    meta = _metadata(data)
    meta[key] = change if isinstance(change, str) else json.dumps(change(json.loads(meta[key])))
    return save_bytes(dict(load_bytes(data)), metadata=meta)


def _raw(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """``data`` with its header JSON edited under the same tensor bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def _layer(record: dict[str, Any], name: str, **values: Any) -> dict[str, Any]:
    record["layers"][name].update(values)
    return record


def _config(files: dict[str, bytes], change: Callable[[dict[str, Any]], Any] | bytes) -> dict[str, bytes]:
    key = "adapter/adapter_config.json"
    if isinstance(change, bytes):
        return {**files, key: change}
    config = json.loads(files[key])
    return {**files, key: json.dumps(change(config) or config).encode()}


def _set(d: dict[str, Any], **values: Any) -> dict[str, Any]:
    d.update(values)
    return d


def entries() -> dict[str, tuple[dict[str, bytes], str, str, str | None]]:
    """name -> (files, entry path, load error regex, inspect error regex or None)."""
    native = _seed("native-shared")["a.safetensors"]
    peft = _seed("peft")
    weights = "adapter/adapter_model.safetensors"
    diffusers = _seed("diffusers-foreign")["d.safetensors"]
    alpha_keys = _seed("diffusers-alpha")["d.safetensors"]
    kohya = _seed("kohya")["k.safetensors"]
    tucker = _seed("kohya-tucker")["k.safetensors"]
    marker_pickle = pickle.dumps({"fc.weight": WritesMarker()})
    buffer = io.BytesIO()
    torch.save({"fc.weight": WritesMarker()}, buffer)
    marker_pt = buffer.getvalue()
    not_valid = "not a valid safetensors file"
    out: dict[str, tuple[dict[str, bytes], str, str, str | None]] = {}

    def add(name: str, files: dict[str, bytes] | bytes, load: str, inspect: str | None = "same") -> None:
        """A single file becomes ``<name>.safetensors``; a folder's files go under ``<name>/``."""
        if isinstance(files, bytes):
            files, entry = {f"{name}.safetensors": files}, f"{name}.safetensors"
        else:
            entry = f"{name}/{next(iter(files)).split('/')[0]}"
            files = {f"{name}/{k}": v for k, v in files.items()}
        out[name] = (files, entry, load, load if inspect == "same" else inspect)

    # The container: safetensors' own framing.
    add("empty", b"", not_valid)
    add("truncated", native[: len(native) // 2], r"truncated: its header claims \d+ bytes")
    add("truncated-in-header", native[:40], r"truncated: its header claims \d+ bytes")
    add("header-length-lies", struct.pack("<Q", 2**40) + native[8:], r"header claims 1099511627776 bytes")
    add("header-lies-about-size", _raw(native, lambda h: h["fc.lora_A.weight"].update(shape=[2, 9])), not_valid)
    add("header-nested-json", b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"[" * 31 + b"]" * 1, not_valid)
    add("pickle-named-safetensors", marker_pickle, not_valid)
    # Tensors that lie or are poisoned.
    # regression: the dtype lies with a consistent byte size, so only visionlora's own checks see it
    add(
        "header-lies-about-dtype",
        _raw(native, lambda h: h["fc.lora_A.weight"].update(dtype="I32")),
        r"tensor 'fc.lora_A.weight' has dtype torch.int32",
    )
    add(
        "header-lies-about-shape",
        _raw(native, lambda h: h["fc.lora_A.weight"].update(shape=[4, 4])),
        r"fc.lora_A.weight: shape \(4, 4\) in the file, \(2, 8\) expected for rank 2",
        None,
    )
    add(
        "nan-tensor",
        _retensor(native, lambda t: t["pw.lora_B.weight"].view(-1).__setitem__(3, math.nan)),
        r"tensor 'pw.lora_B.weight' holds NaN or Inf",
    )
    add(
        "inf-tensor",
        _retensor(native, lambda t: t["stem.lora_A.weight"].view(-1).__setitem__(0, -math.inf)),
        r"tensor 'stem.lora_A.weight' holds NaN or Inf",
    )
    # regression: finite in float64, Inf once copied into the float32 model
    add(
        "inf-after-cast",
        _retensor(native, lambda t: t.__setitem__("fc.lora_B.weight", torch.full((4, 2), 1e300, dtype=torch.float64))),
        r"fc.lora_B.weight: its values overflow the model's torch.float32",
        None,
    )
    add(
        "int-tensor",
        _retensor(native, lambda t: t.__setitem__("pw.lora_A.weight", torch.ones(2, 8, 1, 1, dtype=torch.int64))),
        r"tensor 'pw.lora_A.weight' has dtype torch.int64",
    )
    add(
        "complex-tensor",
        _retensor(native, lambda t: t.__setitem__("fc.lora_A.weight", torch.ones(2, 8, dtype=torch.complex64))),
        r"tensor 'fc.lora_A.weight' has dtype torch.complex64",
    )
    add(
        "bool-tensor",
        _retensor(native, lambda t: t.__setitem__("fc.lora_B.weight", torch.ones(4, 2, dtype=torch.bool))),
        r"tensor 'fc.lora_B.weight' has dtype torch.bool",
    )
    # The visionlora record.
    add(
        "rank-lies",
        _remeta(native, "visionlora", lambda r: _layer(r, "fc", rank=3)),
        r"fc.lora_A.weight: shape \(2, 8\) in the file, \(3, 8\) expected for rank 3",
        None,
    )
    add(
        "absurd-rank",
        _remeta(native, "visionlora", lambda r: _layer(r, "pw", rank=2**20)),
        r"layer 'pw': rank 1048576 is not an integer in \[1, 65536\]",
    )
    add("rank-zero", _remeta(native, "visionlora", lambda r: _layer(r, "pw", rank=0)), r"rank 0 is not an integer")
    add(
        "rank-bool", _remeta(native, "visionlora", lambda r: _layer(r, "pw", rank=True)), r"rank True is not an integer"
    )
    add(
        "rank-string", _remeta(native, "visionlora", lambda r: _layer(r, "pw", rank="2")), r"rank '2' is not an integer"
    )
    add(
        "alpha-nan",
        _remeta(native, "visionlora", lambda r: _layer(r, "stem", alpha=math.nan)),
        r"layer 'stem': alpha nan is not a finite number > 0",
    )
    add(
        "alpha-huge-int",
        _remeta(native, "visionlora", lambda r: _layer(r, "stem", alpha=10**400)),
        r"layer 'stem': alpha 1000.* is not a finite number > 0",
    )
    add(
        "alpha-negative",
        _remeta(native, "visionlora", lambda r: _layer(r, "stem", alpha=-1)),
        r"alpha -1 is not a finite number > 0",
    )
    add(
        "unknown-module",
        _retensor(
            _remeta(native, "visionlora", lambda r: _set(r, layers={"ghost": r["layers"]["fc"], **r["layers"]})),
            lambda t: t.update(
                {
                    "ghost.lora_A.weight": t["fc.lora_A.weight"].clone(),
                    "ghost.lora_B.weight": t["fc.lora_B.weight"].clone(),
                }
            ),
        ),
        r"ghost: no such module in FuzzNet",
        None,
    )
    add("unknown-key", _retensor(native, lambda t: t.update(evil=torch.zeros(1))), r"unexpected \['evil'\]")
    add("metadata-not-json", _remeta(native, "visionlora", "{not json"), r"metadata is not valid JSON")
    add("metadata-a-list", _remeta(native, "visionlora", "[]"), r"metadata 'format' is not 'visionlora.adapter'")
    add("json-bomb", _remeta(native, "visionlora", "[" * 4000), r"metadata is not valid JSON \(RecursionError")
    add(
        "config-wrong-type",
        _remeta(native, "visionlora", lambda r: _set(r, config={**r["config"], "rank": "8"})),
        r"stored config is invalid: rank: expected int, got str '8'",
    )
    # regression: a 5000-digit decimal key raised a bare ValueError from int()
    add(
        "huge-decimal-key",
        _remeta(native, "visionlora", lambda r: _set(r, config={**r["config"], "rank_by_resolution": {"9" * 5000: 4}})),
        r"stored config is invalid: rank_by_resolution: expected dict\[int, int\]",
    )
    # regression: a deeply nested regex raised RecursionError from re.compile
    add(
        "nested-regex",
        _remeta(
            native,
            "visionlora",
            lambda r: _set(r, config={**r["config"], "targets": ["re:" + "(" * 1500 + ")" * 1500]}),
        ),
        r"stored config is invalid: targets: .* is not a valid regular expression",
    )
    # regression: a huge repeat count raised OverflowError from re.compile
    add(
        "huge-repeat-regex",
        _remeta(native, "visionlora", lambda r: _set(r, config={**r["config"], "targets": ["re:a{99999999999}"]})),
        r"is not a valid regular expression: 'the repetition number is too large'",
    )
    # PEFT folders.
    add(
        "peft-config-wrong-type",
        _config(peft, lambda c: _set(c, r="2")),
        r"adapter_config.json: entries with values PEFT does not write: r='2'",
    )
    add("peft-config-a-list", _config(peft, b"[]"), r"adapter: peft_type is \[\]")
    add(
        "peft-config-json-bomb",
        _config(peft, b"[" * 4000),
        r"adapter_config.json: not a readable JSON file \(RecursionError",
    )
    add(
        "peft-config-not-utf8",
        _config(peft, b'{"peft_type": "LORA\xff"}'),
        r"adapter_config.json: not a readable JSON file \(UnicodeDecodeError",
    )
    add(
        "peft-config-rank-lies",
        _config(peft, lambda c: _set(c, r=5)),
        r"layer 'fc': the config gives rank 5, the tensors rank 2",
    )
    add(
        "peft-config-rank-bool",
        _config(peft, lambda c: _set(c, rank_pattern={"^pw$": True})),
        r"layer 'pw': the config gives rank True, the tensors rank 3",
    )
    add(
        "peft-config-alpha-nan",
        _config(peft, lambda c: _set(c, lora_alpha=math.nan)),
        r"layer 'fc': alpha nan is not a finite number > 0",
    )
    add(
        "peft-config-dropout-huge",
        _config(peft, lambda c: _set(c, lora_dropout=10**400)),
        r"entries with values PEFT does not write: lora_dropout=1000",
    )
    # regression: a deeply nested pattern raised RecursionError from re.match
    add(
        "peft-nested-pattern",
        _config(peft, lambda c: _set(c, rank_pattern={"(" * 600 + ")" * 600: 3})),
        r"rank_pattern key .* is not a pattern visionlora matches",
    )
    add(
        "peft-redos-pattern",
        _config(peft, lambda c: _set(c, alpha_pattern={"(.|..)*x": 2.0})),
        r"alpha_pattern key '\(\.\|\.\.\)\*x' is not a pattern visionlora matches",
    )
    add(
        "peft-dora",
        _config(peft, lambda c: _set(c, use_dora=True)),
        r"use_dora is set but layers .* have no lora_magnitude_vector",
    )
    # regression: a scalar lora_A raised IndexError before the shapes were checked
    add(
        "peft-scalar-lora-a",
        {
            **peft,
            weights: _retensor(
                peft[weights], lambda t: t.__setitem__("base_model.model.fc.lora_A.weight", torch.tensor(1.0))
            ),
        },
        r"layer 'fc': LoRA matrices of shapes \(\) and \(4, 2\) do not pair up",
    )
    pickled = {k: v for k, v in peft.items() if k != weights}
    pickled["adapter/adapter_model.bin"] = marker_pickle
    add("peft-pickle-only", pickled, r"adapter: no adapter_model.safetensors; adapter_model.bin is a pickle")
    add(
        "folder-without-adapter",
        {"folder/notes.txt": b"not an adapter\n"},
        r"folder: is a folder without adapter_config.json",
    )
    # diffusers files.
    # regression: a complex alpha raised TypeError from float()
    add(
        "diffusers-complex-alpha",
        _retensor(alpha_keys, lambda t: t.__setitem__("fc.alpha", torch.tensor([1 + 1j], dtype=torch.complex64))),
        r"fc.alpha is a torch.complex64 tensor of shape \(1,\), not a real scalar",
    )
    add(
        "diffusers-alpha-zero",
        _retensor(alpha_keys, lambda t: t.__setitem__("pw.alpha", torch.tensor(0.0))),
        r"layer 'pw': alpha 0.0 is not a finite number > 0",
    )
    # regression: a scalar lora_A raised IndexError
    add(
        "diffusers-scalar-lora-a",
        _retensor(diffusers, lambda t: t.__setitem__("unet.stem.lora_A.weight", torch.tensor(2.0))),
        r"layer 'stem': LoRA matrices of shapes \(\) and \(8, 2, 1, 1\) do not pair up",
    )
    add(
        "diffusers-redos-pattern",
        _remeta(diffusers, "lora_adapter_metadata", lambda m: _set(m, **{"unet.alpha_pattern": {"(.*.*)*z": 1}})),
        r"alpha_pattern key '\(\.\*\.\*\)\*z' is not a pattern visionlora matches",
    )
    add(
        "diffusers-metadata-json-bomb",
        _remeta(diffusers, "lora_adapter_metadata", "{" * 4000),
        r"the 'lora_adapter_metadata' header entry is not JSON",
    )
    add(
        "diffusers-unknown-component",
        _retensor(diffusers, lambda t: t.__setitem__("vae.q.lora_A.weight", torch.zeros(2, 3))),
        r"1 keys cannot be mapped onto a pipeline component: \['vae.q.lora_A.weight'\]",
    )
    # kohya files.
    # regression: a kept record whose alpha lies put Inf into the model through the B rescale
    add(
        "kohya-record-alpha-lies",
        _remeta(kohya, "visionlora", lambda r: _layer(r, "fc", alpha=1e-300)),
        r"layer 'fc': the kept visionlora record's scale differs from the file's by a factor of .*overflows",
    )
    add(
        "kohya-alpha-inf",
        _retensor(tucker, lambda t: t.__setitem__("lora_unet_pw.alpha", torch.tensor(math.inf))),
        r"layer 'pw': alpha inf is not a finite number > 0",
    )
    add(
        "kohya-alpha-not-scalar",
        _retensor(tucker, lambda t: t.__setitem__("lora_unet_pw.alpha", torch.ones(3))),
        r"lora_unet_pw.alpha is a torch.float32 tensor of shape \(3,\), not a real scalar",
    )
    add(
        "kohya-tucker-mismatch",
        _retensor(tucker, lambda t: t.__setitem__("lora_unet_stem.lora_mid.weight", torch.ones(2, 5, 3, 3))),
        r"lora_unet_stem: lora_mid \(2, 5, 3, 3\) and lora_down \(2, 3, 1, 1\) are not a Tucker pair",
    )
    # regression: an integer lora_mid was folded into a float A and loaded
    add(
        "kohya-int-mid",
        _retensor(
            tucker, lambda t: t.__setitem__("lora_unet_stem.lora_mid.weight", torch.ones(2, 2, 3, 3, dtype=torch.int32))
        ),
        r"tensor 'lora_unet_stem.lora_mid.weight' has dtype torch.int32",
    )
    add(
        "kohya-up-without-down",
        _retensor(tucker, lambda t: t.pop("lora_unet_fc.lora_down.weight")),
        r"lora_unet_fc: needs both lora_down and lora_up",
    )
    add(
        "kohya-loha",
        _retensor(tucker, lambda t: t.__setitem__("lora_unet_fc.hada_w1_a", torch.zeros(2, 2))),
        r"lora_unet_fc: holds LoRA \(lora_down/lora_up\) and \['hada_w1_a'\] together",
    )
    add(
        "kohya-unknown-module",
        _retensor(
            tucker,
            lambda t: t.update(
                {
                    k.replace("lora_unet_fc", "lora_unet_ghost"): v.clone()
                    for k, v in t.items()
                    if k.startswith("lora_unet_fc.")
                }
            ),
        ),
        r"1 keys cannot be mapped onto a FuzzNet: \['lora_unet_ghost'\]",
        None,
    )
    out["pickle.pt"] = ({"pickle.pt": marker_pt}, "pickle.pt", not_valid, not_valid)
    return out


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = {}
    for name, (files, entry, load, inspect) in entries().items():
        for rel, content in files.items():
            (OUT / rel).parent.mkdir(parents=True, exist_ok=True)
            (OUT / rel).write_bytes(content)
        manifest[name] = {"path": entry, "model": "fuzznet", "load": load, "inspect": inspect}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    sizes = sorted((p.stat().st_size, p.relative_to(OUT).as_posix()) for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(manifest)} entries, {sum(s for s, _ in sizes):,} bytes, largest {sizes[-1]}")


if __name__ == "__main__":
    main()
