"""``visionlora quickstart``: LoRA against head-only and full fine-tuning on data that ships with scikit-learn.

1. A ResNet-18 (built locally, no download) is trained in full on digits 0-4: the "pretrained" base.
2. On digits 5-9 (a new task: new classes, new head) four ways are compared from that base:
   only the new head; LoRA on ``layer4`` (r=8, r=16 on its first block) + the head; the same with
   the frozen prefix (stem to layer3) computed once per image instead of every step; everything.
3. The LoRA adapter is saved, reloaded into a freshly built base, merged, and exported for PEFT;
   the reloaded and merged copies' outputs are compared with the trained model's.

About a minute on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionlora._deps import require
from visionlora.config import LoraConfig
from visionlora.inject import apply_lora
from visionlora.io import export_adapter, export_merged, load_adapter, save_adapter
from visionlora.io.files import write_safetensors
from visionlora.merge import merge_and_unload
from visionlora.prefix import split_frozen_prefix

__all__ = ["QuickstartResult", "digits", "run_quickstart"]


def digits(classes: range, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/val tensors (N, 3, size, size) and labels 0..len(classes)-1 for the chosen digits (80/20 split)."""
    data = require("sklearn.datasets").load_digits()
    keep = torch.isin(torch.as_tensor(data.target), torch.as_tensor(list(classes)))
    x = torch.as_tensor(data.images, dtype=torch.float32)[keep].unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.as_tensor(data.target)[keep] - classes.start
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def _fit(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch: int = 64, seed: int = 0) -> None:
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
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _resnet(state: dict[str, Tensor] | None = None) -> nn.Module:
    model = require("torchvision").models.resnet18(num_classes=5)
    if state is not None:
        model.load_state_dict(state)
    model.fc = nn.Linear(512, 5)  # a new head for the new classes
    return model


def _trainable_percent(model: nn.Module) -> float:
    return (
        100.0
        * sum(p.numel() for p in model.parameters() if p.requires_grad)
        / sum(p.numel() for p in model.parameters())
    )


@dataclass
class QuickstartResult:
    """What the quickstart measured; ``rows`` is the printed table."""

    rows: list[dict[str, Any]]
    base_accuracy: float
    reload_max_abs_diff: float
    merge_max_abs_diff: float
    output_scale: float
    files: list[str]


def run_quickstart(out: str | Path, *, epochs: int = 6, seed: int = 0, echo: bool = True) -> QuickstartResult:
    """Run the comparison (see the module docstring), write its files to ``out``, print the table."""
    for needed in ("torchvision", "sklearn"):  # before any work: a missing one is named at once
        require(needed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if echo else (lambda *a, **k: None)
    torch.manual_seed(seed)
    xa, ya, xa_val, ya_val = digits(range(0, 5), seed=seed)
    pretrain = require("torchvision").models.resnet18(num_classes=5)
    say(f"1. pre-training a ResNet-18 in full on digits 0-4 ({len(ya)} images) ...")
    _fit(pretrain, xa, ya, epochs=epochs, lr=2e-3, seed=seed)
    base_state = pretrain.state_dict()
    base_accuracy = _accuracy(pretrain, xa_val, ya_val)

    xb, yb, xb_val, yb_val = digits(range(5, 10), seed=seed)
    rows = []
    lora_model: nn.Module | None = None
    for method in ("head only", "LoRA layer4 + head", "LoRA, cached prefix", "full fine-tuning"):
        say(f"2. digits 5-9 ({len(yb)} images): {method} ...")
        torch.manual_seed(1 + seed)
        model = _resnet(base_state)
        if method == "head only":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("fc."))
        elif method.startswith("LoRA"):
            cfg = LoraConfig(targets="layer4.*", rank=8, alpha=16, rank_pattern={"layer4.0.*": 16}, trainable=["fc"])
            apply_lora(model, cfg)
            lora_model = model if lora_model is None else lora_model  # the uncached one is saved
        started = time.perf_counter()
        lr = 1e-3 if method == "full fine-tuning" else 3e-3
        if method == "LoRA, cached prefix":  # stem to layer3 run once per image, in eval mode
            split = split_frozen_prefix(model)
            split.recalibrate_batchnorm(xb.split(64))  # digits 5-9 are new to the prefix's BatchNorms
            _fit(split.rest, split.features(xb), yb, epochs=epochs, lr=lr, seed=seed)
        else:
            _fit(model, xb, yb, epochs=epochs, lr=lr, seed=seed)
        rows.append(
            {
                "method": method,
                "trainable_percent": _trainable_percent(model),
                "val_accuracy": _accuracy(model, xb_val, yb_val),
                "seconds": time.perf_counter() - started,
            }
        )
    assert lora_model is not None

    say("3. save, reload, merge, export ...")
    write_safetensors(out / "base.safetensors", base_state, {"format": "pt"})  # the digits 0-4 model
    adapter = save_adapter(lora_model, out / "adapter.safetensors", overwrite=True)  # the demo's own folder
    fresh = load_adapter(_resnet(base_state), adapter).eval()
    export_merged(fresh, out / "merged.safetensors", overwrite=True)
    export_adapter(fresh, out / "adapter-peft", format="peft", overwrite=True)  # PeftModel.from_pretrained loads it
    with torch.no_grad():
        expected = lora_model(xb_val)
        reload_err = float((fresh(xb_val) - expected).abs().max())
        merge_err = float((merge_and_unload(fresh)(xb_val) - expected).abs().max())
    files = sorted(p.name for p in out.iterdir())
    result = QuickstartResult(rows, base_accuracy, reload_err, merge_err, float(expected.abs().max()), files)
    if echo:
        _print(result, out)
    (out / "quickstart.json").write_text(json.dumps(result.__dict__, indent=1))
    return result


def _print(result: QuickstartResult, out: Path) -> None:
    print(f"\nbase (digits 0-4, trained in full): val. accuracy {result.base_accuracy:.3f}\n")
    print("| digits 5-9 | trainable | val. accuracy | time |")
    print("| --- | --- | --- | --- |")
    for row in result.rows:
        cells = (
            row["method"],
            f"{row['trainable_percent']:.2f} %",
            f"{row['val_accuracy']:.3f}",
            f"{row['seconds']:.1f} s",
        )
        print("| " + " | ".join(cells) + " |")
    scale = result.output_scale
    print(f"\nmax abs. difference from the trained LoRA model (outputs up to {scale:.1f}):")
    print(f"  adapter reloaded onto a fresh base: {result.reload_max_abs_diff:.2g}")
    print(f"  merged (plain ResNet-18):           {result.merge_max_abs_diff:.2g}")
    print("  (adapter-peft/ loads with peft.PeftModel.from_pretrained onto the same base)")
    print(f"\nfiles in {out}: {', '.join(result.files)}")
