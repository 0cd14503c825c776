"""What only a GPU exercises (marked ``gpu``): the merge math of every family in fp16/bf16 on the device
with unmerge bit for bit, and ``torch.compile(fullgraph=True)`` of an adapted ResNet-50 and UNet
(no graph breaks) matching eager, forward and backward.

Skipped without CUDA. ``scripts/gpu_check.sh --smoke`` runs them on the CPU
(``VISIONLORA_GPU_TESTS=cpu``, compiling with the ``aot_eager`` backend instead of inductor), so
they are known to work before a GPU is at hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl
from tests.conftest import GPU_TESTS_DEVICE, assert_rel_close, needs_gpu, tiny_unet, unet_input

pytestmark = [pytest.mark.gpu, needs_gpu]
DEVICE = GPU_TESTS_DEVICE or "cpu"

LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), (8, 64)),
    "conv-grouped-dilated": (lambda: nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4), (4, 16, 12, 12)),
    "conv-strided-reflect": (lambda: nn.Conv2d(8, 24, 3, stride=2, padding=1, padding_mode="reflect"), (2, 8, 15, 15)),
    "conv1x1": (lambda: nn.Conv2d(32, 16, 1), (4, 32, 8, 8)),
}


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                noise = torch.randn(p.shape, generator=g).to(p)
                p.copy_(p * (1 + 0.2 * noise) if name.endswith("magnitude") else noise * 0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["lora", "dora", "loha", "lokr"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_merged_equals_unmerged_and_the_float64_formula_and_unmerge_is_exact(layer, family, dtype):
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    model = vl.apply_lora(nn.Sequential(make()), vl.LoraConfig(targets="0", rank=4, family=family))
    _randomize(model)
    reference = copy.deepcopy(model).double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x.double())
        model.to(DEVICE, dtype)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        unmerged = model(x.to(DEVICE, dtype))
        vl.merge(model)
        merged = model(x.to(DEVICE, dtype))
        vl.unmerge(model)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # the dtype's rounding of inputs, weights and sums
    assert_rel_close(unmerged.double().cpu(), expected, tol)
    assert_rel_close(merged.double().cpu(), expected, tol)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def _resnet50() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import torchvision

    size, batch = (224, 8) if DEVICE == "cuda" else (64, 2)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    targets = [n for n, m in model.named_modules() if n.startswith("layer4") and isinstance(m, nn.Conv2d)]
    vl.apply_lora(model, vl.LoraConfig(targets=targets, rank=8, trainable=["fc"]))
    return model, (torch.randn(batch, 3, size, size),)


def _unet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = tiny_unet()
    vl.apply_lora(model, vl.LoraConfig(targets="preset:unet-attention", rank=4))
    inputs = unet_input()
    return model, (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])


def _output(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.sample


@pytest.mark.parametrize("build", [_resnet50, _unet], ids=["resnet50", "unet"])
def test_compiled_adapted_model_has_no_graph_break_and_trains_as_eager(build):
    torch._dynamo.reset()
    model, inputs = build()
    _randomize(model)
    model.to(DEVICE).train()
    inputs = tuple(t.to(DEVICE) for t in inputs)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # inductor on a CPU would take minutes
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend=backend)
    results = []
    for m in (model, compiled):  # fullgraph=True: any graph break is an error
        out = _output(m, inputs)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (eager, eager_grads), (fast, fast_grads) = results
    assert_rel_close(fast, eager, 1e-4)
    assert {n.removeprefix("_orig_mod.") for n in fast_grads} == set(eager_grads) != set()
    for name, grad in fast_grads.items():
        assert_rel_close(grad, eager_grads[name.removeprefix("_orig_mod.")], 1e-3)
