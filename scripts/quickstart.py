"""Quickstart: adapt a digit classifier to new classes with LoRA, save, reload, merge.

Real data that ships with scikit-learn (``load_digits``), CPU, about a minute:

1. Train a torchvision ResNet-18 (no pretrained weights) in full on digits 0-4: the "pretrained" base.
2. New head for digits 5-9; train only LoRA on ``layer4`` (r=8, r=16 on its first block) and the head.
3. Save the adapter, load it into a freshly built base, check the outputs match; merge and unload,
   check again, and save the plain merged state dict.

Run: ``python scripts/quickstart.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch import Tensor, nn

import visionlora as vl


def digits(classes: range, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/val tensors (N, 3, size, size) and labels 0..len(classes)-1 for the chosen digits."""
    data = load_digits()
    keep = torch.isin(torch.as_tensor(data.target), torch.as_tensor(list(classes)))
    x = torch.as_tensor(data.images, dtype=torch.float32)[keep].unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.as_tensor(data.target)[keep] - classes.start
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch: int = 64, seed: int = 0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def base_model(state: dict[str, Tensor] | None = None) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=5)
    if state is not None:
        model.load_state_dict(state)
    model.fc = nn.Linear(512, 5)  # new head for the new classes (trained in full, saved with the adapter)
    return model


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs for each phase")
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="visionlora-quickstart-"))

    # 1. A base trained in full on digits 0-4 stands in for pretrained weights.
    xa, ya, xa_val, ya_val = digits(range(0, 5))
    pretrain = torchvision.models.resnet18(num_classes=5)
    train(pretrain, xa, ya, epochs=args.epochs, lr=2e-3)
    base_state = pretrain.state_dict()

    # 2. LoRA on layer4 + a new head for digits 5-9.
    xb, yb, xb_val, yb_val = digits(range(5, 10))
    torch.manual_seed(1)
    model = base_model(base_state)
    cfg = vl.LoraConfig(targets="layer4.*", rank=8, alpha=16, rank_pattern={"layer4.0.*": 16}, trainable=["fc"])
    vl.apply_lora(model, cfg)
    print(vl.summary(model))
    train(model, xb, yb, epochs=args.epochs, lr=3e-3)
    acc = accuracy(model, xb_val, yb_val)

    # 3. Save, reload onto a freshly built base, merge.
    adapter_path = vl.save_adapter(model, out / "adapter.safetensors")
    fresh = vl.load_adapter(base_model(base_state), adapter_path).eval()
    with torch.no_grad():
        adapted_out = model(xb_val)
        reload_err = (fresh(xb_val) - adapted_out).abs().max().item()
        plain = vl.merge_and_unload(fresh)
        merge_err = (plain(xb_val) - adapted_out).abs().max().item()
    torch.save(plain.state_dict(), out / "merged.pt")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    results = {
        "base_val_accuracy_digits_0_4": accuracy(pretrain, xa_val, ya_val),
        "lora_val_accuracy_digits_5_9": acc,
        "trainable_percent": 100.0 * trainable / total,
        "reload_max_abs_diff": reload_err,
        "merge_max_abs_diff": merge_err,
        "output_scale": adapted_out.abs().max().item(),
    }
    print()
    print("| what | value |")
    print("| --- | --- |")
    for key, value in results.items():
        print(f"| {key} | {value:.4g} |")
    print(f"\nfiles in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
