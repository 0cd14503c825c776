"""How exactly a UNet LoRA comes back through diffusers' loaders: diffusers' own save vs visionlora's exports.

For each setup a tiny SD-like UNet (built locally, no download) gets a LoRA with random weights; the
LoRA is written, loaded into a fresh copy of the base through a diffusers loading path, and the
output compared with the adapted model's: max |out - expected| / max |expected| over a batch.

    python scripts/diffusers_lora_roundtrip.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import diffusers
import peft
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionlora as vl
from tests.conftest import randomize_lora, tiny_unet, unet_input

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _out(unet: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_input()).sample


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _fresh(base: dict[str, torch.Tensor]) -> torch.nn.Module:
    unet = tiny_unet()
    unet.load_state_dict(base)
    return unet


def diffusers_own_save(rank: int, alpha: float, folder: Path) -> float:
    """peft LoRA on the UNet, saved with save_lora_weights (no metadata passed), loaded back by the pipeline."""
    unet = tiny_unet()
    base = copy.deepcopy(unet.state_dict())
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION))
    randomize_lora(unet, std=0.05)
    expected = _out(unet)
    state = peft.get_peft_model_state_dict(unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state)
    fresh = _fresh(base)
    loaded, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(folder))
    fresh.load_lora_adapter(loaded, network_alphas=alphas, prefix="unet")
    return _error(_out(fresh), expected)


def visionlora_export(cfg: vl.LoraConfig, fmt: str, path_kind: str, folder: Path) -> float:
    unet = tiny_unet()
    base = copy.deepcopy(unet.state_dict())
    vl.apply_lora(unet, cfg, example_input=unet_input(1))
    randomize_lora(unet, std=0.05)
    expected = _out(unet)
    path = vl.export_adapter(unet, folder / "lora.safetensors", format=fmt)  # type: ignore[arg-type]
    fresh = _fresh(base)
    if path_kind == "load_lora_adapter(path)":
        fresh.load_lora_adapter(str(path), prefix="unet")
    else:
        loaded, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
        fresh.load_lora_adapter(loaded, network_alphas=alphas, prefix="unet")
    return _error(_out(fresh), expected)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for rank, alpha in ((4, 8.0), (8, 1.0)):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(
                (
                    f"diffusers save_lora_weights, r={rank} alpha={alpha:g}",
                    "lora_state_dict",
                    diffusers_own_save(rank, alpha, Path(tmp)),
                )
            )
    setups = {
        "r=4 alpha=8": vl.LoraConfig(targets="preset:unet-attention", rank=4, alpha=8.0),
        "r=8 alpha=1": vl.LoraConfig(targets="preset:unet-attention", rank=8, alpha=1.0),
        "ranks 8/4/2, alphas 6/1": vl.LoraConfig(
            targets="preset:unet-attention",
            rank=4,
            alpha=6.0,
            rank_by_resolution={16: 8, 8: 4},
            rank_pattern={"*.to_out.0": 2},
            alpha_pattern={"*.attn2.*": 1.0},
        ),
        "LoCon, ranks 4/2, one alpha 6": vl.LoraConfig(
            targets="preset:unet-locon", rank=4, alpha=6.0, rank_pattern={"*.resnets.*": 2}
        ),
        "LoCon, ranks 4/2, alphas 6/1.5": vl.LoraConfig(
            targets="preset:unet-locon",
            rank=4,
            alpha=6.0,
            rank_pattern={"*.resnets.*": 2},
            alpha_pattern={"*.attn2.*": 1.5},
        ),
    }
    for name, cfg in setups.items():
        formats = ["diffusers", "kohya"] if "LoCon" in name else ["diffusers"]
        for fmt in formats:
            paths = ["lora_state_dict"] + (["load_lora_adapter(path)"] if fmt == "diffusers" else [])
            for path_kind in paths:
                with tempfile.TemporaryDirectory() as tmp:
                    rows.append(
                        (
                            f"visionlora {fmt} export, {name}",
                            path_kind,
                            visionlora_export(cfg, fmt, path_kind, Path(tmp)),
                        )
                    )
    print(f"diffusers {diffusers.__version__}, peft {peft.__version__}, torch {torch.__version__}\n")
    print("| written by | loaded through | relative output error |")
    print("|---|---|---|")
    for who, how, err in rows:
        print(f"| {who} | {how} | {err:.1e} |")


if __name__ == "__main__":
    main()
