"""Resumable checkpoints read as untrusted files: every malformed part is refused and nothing changes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import visionlora as vl
from visionlora.train.checkpoint import load_checkpoint, save_checkpoint


def _run(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model.train()
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler = _run()
    folder = save_checkpoint(
        tmp_path, 2, model=model, optimizer=optimizer, state={"step": 2, "scheduler": scheduler.state_dict()}
    )
    return folder


def _edit_safetensors(path, tensors=None, header=None):
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    data = load_file(path)
    save_file(tensors(data) if tensors else data, path, header(meta) if header else meta)


def _json(path, change):
    path.write_text(change(json.loads(path.read_text())) if callable(change) else change)


def _header_json(key, change):
    """Header entry ``key`` replaced: by ``change(old value)``, by a JSON value, or by raw text."""

    def edit(meta):
        value = change(json.loads(meta[key])) if callable(change) else change
        return {**meta, key: value if isinstance(value, str) else json.dumps(value)}

    return edit


CASES = {
    "state.json is a list": (lambda f: _json(f / "state.json", "[1, 2]"), "not a JSON object"),
    "state.json nested 100000 deep": (lambda f: _json(f / "state.json", "[" * 100_000), "RecursionError"),
    "state.json not UTF-8": (lambda f: (f / "state.json").write_bytes(b"\xff\xfe{"), "not a complete checkpoint"),
    "NaN weight": (
        lambda f: _edit_safetensors(
            f / "trainable.safetensors", tensors=lambda t: {**t, "0.weight": torch.full_like(t["0.weight"], torch.nan)}
        ),
        r"tensor '0.weight' holds NaN or Inf",
    ),
    "float64 weight that overflows float32": (
        lambda f: _edit_safetensors(
            f / "trainable.safetensors",
            tensors=lambda t: {**t, "2.bias": torch.full((2,), 1e300, dtype=torch.float64)},
        ),
        r"tensor '2.bias' holds NaN or Inf \(in the model's torch.float32\)",
    ),
    "integer weight": (
        lambda f: _edit_safetensors(
            f / "trainable.safetensors", tensors=lambda t: {**t, "2.bias": torch.zeros(2, dtype=torch.int32)}
        ),
        r"tensor '2.bias' is torch.int32, the model's is torch.float32",
    ),
    "float step counter": (
        lambda f: _edit_safetensors(
            f / "trainable.safetensors", tensors=lambda t: {**t, "1.num_batches_tracked": torch.tensor(2.0)}
        ),
        r"'1.num_batches_tracked' is torch.float32, the model's is torch.int64",
    ),
    "weight of another shape": (
        lambda f: _edit_safetensors(f / "trainable.safetensors", tensors=lambda t: {**t, "2.bias": torch.zeros(5)}),
        r"unknown or reshaped \['2.bias'\]",
    ),
    "lr is a string": (
        lambda f: _edit_safetensors(
            f / "optimizer.safetensors",
            header=_header_json("param_groups", lambda g: [{**g[0], "lr": "fast"}]),
        ),
        "param_groups do not match this run's optimizer",
    ),
    "param_groups deeply nested": (
        lambda f: _edit_safetensors(f / "optimizer.safetensors", header=_header_json("param_groups", "[" * 50_000)),
        "header entry 'param_groups' is not JSON",
    ),
    "optimizer state of another shape": (
        lambda f: _edit_safetensors(
            f / "optimizer.safetensors", tensors=lambda t: {**t, "0.exp_avg": torch.zeros(7, 7)}
        ),
        r"tensor '0.exp_avg' \(7, 7\) is no state of this run's parameters",
    ),
    "optimizer state for a parameter that does not exist": (
        lambda f: _edit_safetensors(f / "optimizer.safetensors", tensors=lambda t: {**t, "99.exp_avg": torch.zeros(1)}),
        r"tensor '99.exp_avg' \(1,\) is no state",
    ),
    "optimizer scalars not an object": (
        lambda f: _edit_safetensors(f / "optimizer.safetensors", header=_header_json("scalars", "[]")),
        "'scalars' is not a JSON object",
    ),
    "torch RNG state of the wrong size": (
        lambda f: _edit_safetensors(
            f / "rng-0.safetensors", tensors=lambda t: {**t, "torch": torch.zeros(3, dtype=torch.uint8)}
        ),
        "not a random-generator state",
    ),
    "Python RNG state garbage": (
        lambda f: _edit_safetensors(f / "rng-0.safetensors", header=_header_json("python", [3, [1, 2], None])),
        "not a random-generator state",
    ),
    "scheduler state of another shape": (
        lambda f: _json(f / "state.json", lambda s: json.dumps({**s, "scheduler": {"last_epoch": "x"}})),
        r"'scheduler' does not match this run's LambdaLR",
    ),
    "scheduler missing": (
        lambda f: _json(f / "state.json", lambda s: json.dumps({"step": 2})),
        r"no 'scheduler' entry",
    ),
}


def _everything(model, optimizer, scheduler):
    import numpy as np

    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        repr(optimizer.state_dict()),
        {
            i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for i, s in optimizer.state_dict()["state"].items()
        },
        json.dumps(scheduler.state_dict()),
        torch.get_rng_state(),
        random.getstate(),
        repr(np.random.get_state()),
    )


def _assert_same(before, after):
    (s1, g1, o1, t1, sch1, rng1, py1, np1), (s2, g2, o2, t2, sch2, rng2, py2, np2) = before, after
    assert list(s1) == list(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert g1 == g2 and sch1 == sch2 and py1 == py2 and np1 == np2 and torch.equal(rng1, rng2)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[i][k], t2[i][k]) for i in t1 for k in t1[i])
    assert o1 == o2


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_checkpoint_is_refused_and_nothing_changes(saved, case):
    corrupt, message = CASES[case]
    corrupt(saved)
    model, optimizer, scheduler = _run(seed=1)
    random.seed(5)
    before = _everything(model, optimizer, scheduler)
    with pytest.raises(vl.AdapterFileError, match=message) as info:
        load_checkpoint(saved, model=model, optimizer=optimizer, stateful={"scheduler": scheduler})
    assert str(saved) in str(info.value)
    _assert_same(before, _everything(model, optimizer, scheduler))


def test_an_intact_checkpoint_restores_model_optimizer_scheduler_and_rng(saved):
    model, optimizer, scheduler = _run(seed=1)
    state = load_checkpoint(saved, model=model, optimizer=optimizer, stateful={"scheduler": scheduler})
    reference, ref_optimizer, ref_scheduler = _run(seed=0)
    assert state["step"] == 2
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert scheduler.state_dict()["last_epoch"] == ref_scheduler.state_dict()["last_epoch"] == 2
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], ref_optimizer.state_dict()["state"][0]["exp_avg"])
