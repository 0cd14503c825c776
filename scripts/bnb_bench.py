"""LoRA on bitsandbytes bases (LLM.int8, NF4, FP4) against fp32 and visionlora's int8: memory, step time, accuracy.

    python scripts/bnb_bench.py                       # both tables (CPU: about 3 minutes on 2 cores)
    python scripts/bnb_bench.py --only speed --device cuda

speed: a ViT-S/16 (timm, random weights: the Linear layers are what bitsandbytes holds) with LoRA r=8 on
every block's qkv and proj, batch 8 at 128 px on CPU (32 at 224 on CUDA): the frozen model's state in
MB and one training step, rounds interleaved.
quality: an MLP (64-256-256) trained on digits 0-4 in fp32 (scikit-learn's load_digits), then frozen
in each form; LoRA r=8 on its three Linears and a new head learn digits 5-9, over seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: the timing helpers
from int8_bench import print_scores, run_tables, state_mb

import visionlora as vl

BASES: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int8 (visionlora)": {"backend": "visionlora"},
    "LLM.int8 (bitsandbytes)": {"bits": 8, "backend": "bitsandbytes"},
    "NF4 (bitsandbytes)": {"bits": 4, "quant_type": "nf4"},
    "FP4 (bitsandbytes)": {"bits": 4, "quant_type": "fp4"},
}
HEAD = "fp32, the new head alone (no LoRA)"


def held(model: nn.Module, how: dict[str, Any] | None, skip: list[str]) -> nn.Module:
    return model if how is None else vl.quantize_base(model, skip=skip, **how)


def speed(args: argparse.Namespace) -> None:
    import timm

    size, batch = (224, 32) if args.device == "cuda" else (128, 8)
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=size).to(args.device)
    x = torch.randn(batch, 3, size, size, device=args.device)
    y = torch.randint(0, 10, (batch,), device=args.device)
    targets = [n for n, m in base.named_modules() if n.endswith(("attn.qkv", "attn.proj"))]
    cfg = vl.LoraConfig(targets=targets, rank=8, alpha=8, trainable=["head"])
    models = {name: held(vl.apply_lora(copy.deepcopy(base), cfg), how, []) for name, how in BASES.items()}
    steps = {name: bench.train_step(m.train(), lambda m: F.cross_entropy(m(x), y))[0] for name, m in models.items()}
    times = bench.rounds(steps, args.repeats, 1, args.device)
    print(
        f"\n| ViT-S/16, LoRA r=8 on qkv and proj, batch {batch} at {size} px ({args.device}) "
        "| model state, MB | s/step | ratio to fp32 |"
    )
    print("| --- | --- | --- | --- |")
    for name, m in models.items():
        ratio = bench.paired_ratio(times, name, "fp32")
        print(f"| {name} | {state_mb(m):.1f} | {statistics.median(times[name]):.3f} | {ratio:.2f} |")


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)
    split = torch.arange(len(y)) % 4 == 0  # a quarter held out
    return x[~split], y[~split], x[split], y[split]


LR = 3e-3


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (64,), generator=generator)
        loss = F.cross_entropy(model.train()(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def quality(args: argparse.Namespace) -> None:
    x, y, vx, vy = _digits()
    first, second = y < 5, vy >= 5
    scores: dict[str, list[float]] = {name: [] for name in [*BASES, HEAD]}
    for seed in args.seeds:
        torch.manual_seed(seed)
        trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        pretrained = nn.Sequential(trunk, nn.ReLU(), nn.Linear(256, 5))
        _fit(pretrained, x[first], y[first], args.steps, seed)
        for name, how in [*BASES.items(), (HEAD, None)]:
            torch.manual_seed(seed)
            model = nn.Sequential(copy.deepcopy(trunk), nn.ReLU(), nn.Linear(256, 5))
            if name == HEAD:
                model[0].requires_grad_(False)
            else:
                vl.apply_lora(model, vl.LoraConfig(targets=["0.0", "0.2", "0.4"], rank=8, alpha=16, trainable=["2"]))
                held(model, how, ["2"])
            _fit(model, x[~first], y[~first] - 5, args.steps, seed)
            with torch.no_grad():
                scores[name].append((model.eval()(vx[second]).argmax(1) == vy[second] - 5).float().mean().item())
        print(f"seed {seed}: " + ", ".join(f"{n}: {s[-1]:.3f}" for n, s in scores.items()), flush=True)
    print_scores(f"digits 5-9 on an MLP trained on 0-4, LoRA r=8 + new head, {len(args.seeds)} seeds", scores)


if __name__ == "__main__":
    run_tables(__doc__, {"quality": quality, "speed": speed}, repeats=6, steps=300)
