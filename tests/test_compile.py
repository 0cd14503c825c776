"""Adapted models compile with ``torch.compile(fullgraph=True)``: one graph, eager's outputs and gradients.

``aot_eager`` traces forward and backward exactly as inductor would but runs them without code
generation, so the check is the same on a CPU without a compiler toolchain.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl
from tests.conftest import randomize_lora

# Tiny grouped convs get adapters larger than themselves; that is the point here, not a mistake.
pytestmark = pytest.mark.filterwarnings("ignore:adapter has more parameters:UserWarning")


class Mixed(nn.Module):
    """Every conv configuration the layers support, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", stride=2)
        self.reflect = nn.Conv2d(8, 8, (1, 3), padding=(0, 1), padding_mode="reflect", bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.plain, self.grouped, self.circular, self.reflect, self.depthwise):
            x = F.relu(conv(x))
        return self.head(x.mean((2, 3)))


CONFIGS = {
    "per-group": vl.LoraConfig(targets="*", rank=2, alpha=3, rank_pattern={"depthwise": 1}),
    "shared, rslora, dropout": vl.LoraConfig(
        targets="*", rank=2, conv_groups="shared", rslora=True, dropout=0.1, rank_pattern={"depthwise": 1}
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_adapted_model_compiles_as_one_graph_with_eager_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = vl.apply_lora(Mixed(), CONFIGS[name])
    randomize_lora(model)
    model.eval() if "dropout" in name else model.train()  # dropout draws differ between eager and compiled
    x = torch.randn(2, 3, 12, 12)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for m in (model, compiled):
        m(x).square().mean().backward()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in twin.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_two_adapters_disabled_and_merged_states_each_compile_as_one_graph():
    torch.manual_seed(0)
    model = vl.apply_lora(Mixed(), vl.LoraConfig(targets="*", rank=2, rank_pattern={"depthwise": 1}))
    vl.apply_lora(model, vl.LoraConfig(targets=["plain", "head"], rank=3), adapter_name="second")
    randomize_lora(model)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    states = {
        "both": lambda: vl.set_adapter(model, ["default", "second"]),
        "disabled": lambda: vl.disable_adapters(model),
        "merged": lambda: (vl.enable_adapters(model), vl.merge(model)),
    }
    for state, enter in states.items():
        enter()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), state
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x), msg=state)


# An adapted UNet compiling as one graph (fullgraph=True) with eager's outputs and gradients is
# tests/test_gpu.py::test_compiled_adapted_model_has_no_graph_break_and_trains_as_eager[unet], which the
# suite runs on the CPU through scripts/gpu_check.sh --smoke (tests/test_gpu_check.py).
