"""scripts/bench.py: its statistics, its round order, and that every contender gets the same task."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("visionlora_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_paired_ratios_and_quartiles(bench: ModuleType) -> None:
    times = {"a": [1.0, 2.0, 3.0, 4.0, 5.0], "ref": [1.0, 1.0, 2.0, 2.0, 2.5]}
    assert bench.paired_ratios(times, "a", "ref") == [1.0, 2.0, 1.5, 2.0, 2.0]
    assert bench.paired_ratio(times, "a", "ref") == 2.0
    assert bench.quartiles([1.0, 2.0, 1.5, 2.0, 2.0]) == (1.5, 2.0)
    assert bench.quartiles([1.25]) == (1.25, 1.25)


def test_rounds_alternate_their_order(bench: ModuleType) -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.rounds(steps, repeats=3, per_round=2, device="cpu")
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == list("aabbcc" + "ccbbaa" + "aabbcc")
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_resnet_contenders_start_from_the_same_model(bench: ModuleType) -> None:
    models, loss, _ = bench.resnet_contenders("cpu")
    with torch.no_grad():
        losses = {name: loss(m).item() for name, m in models.items()}
    first = losses["full fine-tuning"]
    assert losses == pytest.approx(dict.fromkeys(losses, first), rel=1e-6)  # LoRA starts as the identity

    def trainable(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    full = models["full fine-tuning"]
    convs = [m for n, m in full.named_modules() if n.startswith("layer4") and isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10
    lora = sum(8 * (c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels) for c in convs)
    head = sum(p.numel() for p in full.fc.parameters())
    assert trainable(models["visionlora"]) == trainable(models["peft"]) == lora + head


def test_unet_contenders_start_from_the_same_model(bench: ModuleType) -> None:
    models, loss, inputs = bench.unet_contenders("cpu")
    losses = {}
    for name, m in models.items():
        inputs["sample"].grad = None
        value = loss(m)
        value.backward()
        losses[name] = value.item()
        # only the floor sends a gradient back to the input (its weights get none)
        assert (inputs["sample"].grad is not None) == (name == "floor")
    assert losses == pytest.approx(dict.fromkeys(losses, losses["floor"]), rel=1e-6)
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    assert trainable["visionlora"] == trainable["peft (add_adapter)"] == 53_760
    assert trainable["floor"] == 0
    assert all(p.grad is None for p in models["floor"].parameters())
