"""How many random nn.ConvTranspose1d/2d/3d configurations come out right with visionlora and with PEFT.

Draws N random configurations of what torch's transposed convolutions accept (dimension 1-3,
kernel, stride, padding, output padding below max(stride, dilation), dilation, groups, bias) plus a
LoRA rank in 1..6; configurations torch refuses are redrawn and not counted. For each tool the
result is "right" when: the tool accepts the layer (else "refused"); with random non-zero A and B
the unmerged output equals the reference (else "unmerged wrong"); merging succeeds and the merged
output equals the reference (else "merged wrong"); and unmerging restores W bit for bit (else
"unmerge not exact").

The reference is ``F.conv_transposeNd`` with the base's own geometry on W + ΔW, ΔW written here
from the textbook formula on visionlora's A ``(in, r, *k)`` and B ``(out, r, 1, ...)``: ΔW[i, o, k]
= s · Σ_t A[i, t, k] B[g(i)·out/g + o, t] (float64), never by visionlora's own delta function.
"Equals" means ``max|out - ref| <= 1e-4 · max|ref|`` in float32.

    python scripts/conv_transpose_configs_vs_peft.py --n 200
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FUNCTION = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def draw(rng: random.Random) -> tuple[dict, nn.Module, torch.Tensor]:
    """A configuration torch accepts, its layer and an input."""
    while True:
        dims, groups = rng.randint(1, 3), rng.choice([1, 1, 2, 3, 4])
        stride, dilation = rng.randint(1, 3), rng.randint(1, 3)
        c = {
            "dims": dims,
            "in": groups * rng.randint(1, 4),
            "out": groups * rng.randint(1, 4),
            "kernel": rng.randint(1, 4),
            "stride": stride,
            "padding": rng.randint(0, 3),
            "output_padding": rng.randint(0, max(stride, dilation) - 1),
            "groups": groups,
            "bias": rng.random() < 0.5,
            "dilation": dilation,
            "rank": rng.randint(1, 6),
        }
        try:
            layer = TRANSPOSED[dims](
                c["in"],
                c["out"],
                c["kernel"],
                c["stride"],
                c["padding"],
                c["output_padding"],
                c["groups"],
                c["bias"],
                c["dilation"],
            )
            x = torch.randn(2, c["in"], *([4 if dims == 3 else 6] * dims))
            if layer(x).numel() == 0:
                continue
        except (RuntimeError, ValueError):
            continue
        return c, layer, x


def reference(c: dict, layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
    groups, out = c["groups"], c["out"]
    per_in, per_out = c["in"] // groups, out // groups
    a64, b64 = a.double(), b.double().flatten(1)
    delta = torch.zeros_like(layer.weight, dtype=torch.float64)
    for i in range(c["in"]):
        rows = b64[(i // per_in) * per_out : (i // per_in + 1) * per_out]  # (out/g, r)
        delta[i] = torch.einsum("t...,ot->o...", a64[i], rows) * scale
    bias = None if layer.bias is None else layer.bias.double()
    geometry = (c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"])
    return FUNCTION[c["dims"]](x.double(), layer.weight.double() + delta, bias, *geometry)


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((out.double() - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-12))


def visionlora_outcome(c: dict, layer: nn.Module, x: torch.Tensor) -> str:
    model = nn.Sequential(layer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vl.apply_lora(model, vl.LoraConfig(targets=["0"], rank=c["rank"], alpha=2.0))
    except vl.VisionLoraError:
        return "refused"
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.lora_B.normal_(std=0.3)
    ref = reference(c, model[0].base, x, adapter.lora_A, adapter.lora_B, 2.0 / c["rank"])
    if not close(model(x), ref):
        return "unmerged wrong"
    original = model[0].base.weight.detach().clone()
    vl.merge(model)
    if not close(model(x), ref):
        return "merged wrong"
    vl.unmerge(model)
    return "right" if torch.equal(model[0].base.weight, original) else "unmerge not exact"


def peft_outcome(c: dict, layer: nn.Module, x: torch.Tensor) -> str:
    try:
        import peft
    except ImportError:
        return "not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(nn.Sequential(layer), peft.LoraConfig(target_modules=["0"], r=c["rank"]))
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return "refused"
    return "accepted (not checked)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    counts: dict[str, Counter[str]] = {"visionlora": Counter(), "peft": Counter()}
    for _ in range(args.n):
        c, layer, x = draw(rng)
        counts["visionlora"][visionlora_outcome(c, layer, x)] += 1
        counts["peft"][peft_outcome(c, layer, x)] += 1
    print(f"{args.n} random ConvTranspose1d/2d/3d configurations (seed {args.seed})\n")
    print("| tool | outcome | configurations |")
    print("|---|---|---|")
    for tool, counter in counts.items():
        for outcome, count in counter.most_common():
            print(f"| {tool} | {outcome} | {count} |")


if __name__ == "__main__":
    main()
