"""bitsandbytes bases where bitsandbytes is meant to run (marked ``gpu``): its CUDA kernels under every
family in bf16, the float weight read back from CUDA's packed layouts, and a UNet diffusers loads with a
``BitsAndBytesConfig`` (CUDA only) adapted, trained a step and exported as a float merged folder.

Skipped without CUDA or bitsandbytes; ``scripts/gpu_check.sh --smoke`` runs the first two on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl
from tests.conftest import GPU_TESTS_DEVICE, needs_gpu, randomize_lora, tiny_unet, unet_input
from visionlora.bnb import bnb_bits, held_weight

pytestmark = [pytest.mark.gpu, needs_gpu, pytest.mark.usefixtures("one_bnb_cpu_kernel")]
DEVICE = GPU_TESTS_DEVICE or "cpu"
bnb = pytest.importorskip("bitsandbytes")

KINDS = [(8, "nf4"), (4, "nf4"), (4, "fp4")]


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).to(DEVICE, dtype)


@pytest.mark.parametrize(("bits", "kind"), KINDS, ids=["int8", "nf4", "fp4"])
def test_the_float_weight_read_back_on_the_device_is_the_one_its_kernel_uses(bits, kind):
    model = vl.quantize_base(_mlp(), bits, backend="bitsandbytes", quant_type=kind)
    layer = model[0].train()
    x = torch.randn(16, 64, device=DEVICE)
    expected = F.linear(x, held_weight(layer).float(), layer.bias)
    with torch.no_grad():
        got = layer(x)
    # LLM.int8 on CUDA also rounds the input to int8 (row-wise absmax), about 1 % of each output.
    tol = 2e-2 if bits == 8 and DEVICE == "cuda" else 1e-4
    assert (got - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize("family", ["lora", "dora", "loha", "lokr"])
@pytest.mark.parametrize(("bits", "kind"), KINDS[:2], ids=["int8", "nf4"])
def test_each_family_on_a_bf16_bitsandbytes_base_trains_and_is_its_formula(bits, kind, family):
    model = vl.quantize_base(_mlp(torch.bfloat16), bits, backend="bitsandbytes", quant_type=kind)
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=4, alpha=8, family=family))
    randomize_lora(model)
    model.to(DEVICE)
    x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = model.train()(x)
    with torch.no_grad():
        h = x.detach().float()
        for i in (0, 2):
            layer = model[i]
            weight = held_weight(layer.base).float() + layer.delta_weight(torch.float32)
            h = F.linear(h, weight, layer.base.bias.float())
            h = torch.relu(h) if i == 0 else h
    assert (out.float() - h).abs().max() <= 3e-2 * h.abs().max()  # bf16 (and LLM.int8's input rounding)
    out.float().square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trained)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_unet_diffusers_loads_in_nf4_trains_and_exports_a_float_merged_folder(tmp_path):
    if DEVICE != "cuda":
        pytest.skip("diffusers quantizes with bitsandbytes on CUDA only")
    diffusers = pytest.importorskip("diffusers")
    tiny_unet().save_pretrained(tmp_path / "unet")
    config = diffusers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet", quantization_config=config)
    assert any(bnb_bits(m) == 4 for m in unet.modules())
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=4))
    randomize_lora(unet)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in unet_input().items()}
    loss = unet.train()(**inputs).sample.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad
    )
    with torch.no_grad():
        expected = unet.eval()(**inputs).sample.float()
    vl.export_merged(unet, tmp_path / "merged")
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "merged").to(DEVICE)
    assert not any(bnb_bits(m) for m in merged.modules())
    with torch.no_grad():
        got = merged(**inputs)
    assert (got.sample.float() - expected).abs().max() <= 3e-2 * expected.abs().max()
