"""Weight drift after repeated merge/unmerge cycles, visionlora vs PEFT, per dtype.

Same base (torchvision ResNet-18, LoRA r=8 alpha=16 on layer4 and fc, A and B random
non-zero), cast to each dtype; the weights are compared with the originals after N cycles.

Run: ``python scripts/merge_cycles_vs_peft.py --cycles 100`` (prints a markdown table, writes JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import peft
import torch
import torchvision
from torch import nn

import visionlora as vl

TARGETS = ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2", "fc"]


def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def drift(model: nn.Module, original: dict[str, torch.Tensor], rename: dict[str, str]) -> tuple[float, int]:
    """Largest |w - w0| relative to max|w0| over adapted weights, and how many weights differ at all."""
    worst, changed = 0.0, 0
    state = model.state_dict()
    for key, w0 in original.items():
        w = state[rename[key]]
        if not torch.equal(w, w0):
            changed += 1
            worst = max(worst, ((w.float() - w0.float()).abs().max() / w0.float().abs().max()).item())
    return worst, changed


def run(dtype: torch.dtype, cycles: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    base = torchvision.models.resnet18().to(dtype)
    original = {f"{t}.weight": base.get_submodule(t).weight.detach().clone() for t in TARGETS}

    ours = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=TARGETS, rank=8, alpha=16))
    randomize(ours, 1)
    for _ in range(cycles):
        vl.merge(ours)
        vl.unmerge(ours)
    ours_drift = drift(ours, original, {k: k.replace(".weight", ".base.weight") for k in original})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16))
        randomize(theirs, 1)
        for _ in range(cycles):
            theirs.merge_adapter()
            theirs.unmerge_adapter()
    prefix = "base_model.model."
    theirs_drift = drift(theirs, original, {k: prefix + k.replace(".weight", ".base_layer.weight") for k in original})
    return {
        "visionlora": {"max_rel_drift": ours_drift[0], "weights_changed": ours_drift[1]},
        "peft": {"max_rel_drift": theirs_drift[0], "weights_changed": theirs_drift[1]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--json", type=Path, default=Path("merge_cycles_vs_peft.json"))
    args = parser.parse_args()
    results = {
        str(d).removeprefix("torch."): run(d, args.cycles) for d in (torch.bfloat16, torch.float16, torch.float32)
    }
    versions = f"torch {torch.__version__}, peft {peft.__version__}"
    print(f"{args.cycles} merge/unmerge cycles, {len(TARGETS)} adapted weights, {versions}:\n")
    print("| dtype | visionlora max rel. drift | visionlora changed | PEFT max rel. drift | PEFT changed |")
    print("|---|---|---|---|---|")
    for dtype, r in results.items():
        ours, theirs = r["visionlora"], r["peft"]
        print(
            f"| {dtype} | {ours['max_rel_drift']:.2e} | {ours['weights_changed']} / {len(TARGETS)} | "
            f"{theirs['max_rel_drift']:.2e} | {theirs['weights_changed']} / {len(TARGETS)} |"
        )
    meta = {"torch": torch.__version__, "peft": peft.__version__, "visionlora": vl.__version__, "cycles": args.cycles}
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
