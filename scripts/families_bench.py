"""DoRA, LoHa and LoKr against their reference implementations, and the four families on the quickstart task.

    python scripts/families_bench.py                        # both tables (CPU: ~15 minutes on 2 cores)
    python scripts/families_bench.py --only speed --repeats 10
    python scripts/families_bench.py --only quality --seeds 0 1 2 --json families.json

speed: one training step (forward, backward, AdamW) on the benchmark models of scripts/bench.py
(ResNet-50 with every layer4 conv adapted and the head trained; a small SD-like UNet with its
attention projections adapted), each pair with the same weights, rank and targets: visionlora's DoRA
against PEFT's (``use_dora=True``), visionlora's LoHa and LoKr against LyCORIS' modules (pip
``lycoris-lora``). Rounds are interleaved; "ratio" is the median over rounds of visionlora's time over
the peer's in the same round; "saved MB" is what autograd keeps for backward.

quality: the quickstart's task (a ResNet-18 trained in full on digits 0-4, then digits 5-9 with a new
head, LoRA on every residual block, the recipe's defaults otherwise) with each family at the same
parameter budget (``rank_budget`` = the parameters of the quickstart's default LoRA), over seeds;
mean and spread of the validation accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: the timing helpers and benchmark models

import visionlora as vl


def _copy_into_peft_dora(ours: nn.Module, theirs: nn.Module, targets: list[str]) -> None:
    with torch.no_grad():
        for name in targets:
            ad, layer = ours.get_submodule(name).adapter("default"), theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(ad.lora_A)
            layer.lora_B["default"].weight.copy_(ad.lora_B)
            m = layer.lora_magnitude_vector["default"].weight
            m.copy_(ad.magnitude.reshape(m.shape))


def _lycoris(base: nn.Module, ours: nn.Module, targets: list[str], family: str, options: dict[str, Any]) -> nn.Module:
    """``base`` with LyCORIS' LoHa/LoKr module on each target, holding visionlora's values."""
    from lycoris.modules import LohaModule, LokrModule

    model = copy.deepcopy(base).requires_grad_(False)
    modules = []
    for name in targets:
        ad = ours.get_submodule(name).adapter("default")
        cls = LohaModule if family == "loha" else LokrModule
        module = cls(
            name.replace(".", "_"), model.get_submodule(name), 1.0, lora_dim=ad.rank, alpha=ad.alpha, **options
        )
        with torch.no_grad():
            for key, tensor in ad.tensors().items():
                getattr(module, key).copy_(tensor.reshape(getattr(module, key).shape))
        module.apply_to()
        modules.append(module)
    model.lycoris_modules = nn.ModuleList(modules)  # registered: its parameters train
    model.lycoris_modules.requires_grad_(True)
    return model


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and not name.endswith("magnitude"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def contenders(base: nn.Module, targets: list[str], rank: int, trainable: list[str]) -> dict[str, nn.Module]:
    import peft

    models: dict[str, nn.Module] = {}
    lycoris_options = {"loha": {}, "lokr": {"factor": 8}}
    for family in ("dora", "loha", "lokr"):
        extra = {"lokr_factor": 8} if family == "lokr" else {}
        cfg = vl.LoraConfig(targets=targets, rank=rank, alpha=rank, family=family, trainable=trainable, **extra)
        ours = vl.apply_lora(copy.deepcopy(base), cfg)
        _randomize(ours)
        models[f"visionlora {family}"] = ours
        if family == "dora":
            peft_cfg = peft.LoraConfig(
                r=rank, lora_alpha=rank, target_modules=targets, use_dora=True, modules_to_save=trainable or None
            )
            theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
            _copy_into_peft_dora(ours, theirs, targets)
            models["peft dora"] = theirs
        else:
            theirs = _lycoris(base, ours, targets, family, lycoris_options[family])
            for name in trainable:
                theirs.get_submodule(name).requires_grad_(True)
            models[f"lycoris {family}"] = theirs
    for m in models.values():
        m.train()
    return models


def resnet(device: str, rank: int) -> tuple[dict[str, nn.Module], Callable[[nn.Module], torch.Tensor]]:
    base, x, y, targets = bench.resnet_setup(device)
    return contenders(base, targets, rank, ["fc"]), lambda m: F.cross_entropy(m(x), y)


def unet(device: str, rank: int) -> tuple[dict[str, nn.Module], Callable[[nn.Module], torch.Tensor]]:
    import diffusers

    cfg = bench.unet_config(device)
    torch.manual_seed(0)
    base = diffusers.UNet2DConditionModel(**cfg).to(device)
    size, dim, batch = cfg["sample_size"], cfg["cross_attention_dim"], 4
    sample = torch.randn(batch, 4, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    text = torch.randn(batch, 77, dim, device=device)
    target = torch.randn(batch, 4, size, size, device=device)
    suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")
    targets = [n for n, m in base.named_modules() if n.endswith(suffixes) and isinstance(m, nn.Linear)]
    return contenders(base, targets, rank, []), lambda m: F.mse_loss(m(sample, t, text).sample, target)


def speed_table(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for model_name, build in (("resnet50 layer4", resnet), ("UNet attention", unet)):
        models, loss = build(args.device, args.rank)
        steps, forwards = {}, {}
        for name, m in models.items():
            steps[name], forwards[name] = bench.train_step(m, loss)
        times = bench.rounds(steps, args.repeats, 1, args.device)
        for family, peer in (("dora", "peft dora"), ("loha", "lycoris loha"), ("lokr", "lycoris lokr")):
            ours = f"visionlora {family}"
            table[f"{model_name}, {family}"] = {
                "peer": peer,
                "ours_s": statistics.median(times[ours]),
                "peer_s": statistics.median(times[peer]),
                "ratio": bench.paired_ratio(times, ours, peer),
                "ours_saved_mb": bench.saved_bytes(forwards[ours]) / 2**20,
                "peer_saved_mb": bench.saved_bytes(forwards[peer]) / 2**20,
                "ours_trainable": sum(p.numel() for p in models[ours].parameters() if p.requires_grad),
                "peer_trainable": sum(p.numel() for p in models[peer].parameters() if p.requires_grad),
            }
        print_speed({k: v for k, v in table.items() if k.startswith(model_name)}, args)
    return table


def print_speed(table: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n| model, family ({args.device}) | visionlora s/step | peer | peer s/step | ratio | saved MB (ours / peer) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in table.items():
        saved = f"{r['ours_saved_mb']:.1f} / {r['peer_saved_mb']:.1f}"
        print(f"| {name} | {r['ours_s']:.3f} | {r['peer']} | {r['peer_s']:.3f} | {r['ratio']:.2f} | {saved} |")


def quality_table(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from visionlora.train.quickstart import PRETRAIN, digit_folders, quickstart_recipe
    from visionlora.train.recipe import parse_recipe
    from visionlora.train.run import run_recipe

    scores: dict[str, list[float]] = {}
    trainable: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        task_a, task_b = digit_folders(root / "data")
        for seed in args.seeds:
            out = root / str(seed)
            run_recipe(
                parse_recipe(quickstart_recipe(task_a, "none", args.epochs, seed, PRETRAIN)),
                output=out / "base",
                progress=False,
            )
            base = out / "base" / "merged.safetensors"
            default = run_recipe(
                parse_recipe(quickstart_recipe(task_b, str(base), args.epochs, seed, [])),
                output=out / "lora-default",
                progress=False,
            )
            budget = _lora_params(out / "lora-default" / "adapter.safetensors")
            rows = {"LoRA (quickstart default: ranks by resolution)": default}
            for family in ("lora", "dora", "loha", "lokr"):
                overrides = [f"lora.family={family}", "lora.rank_by_resolution={}", f"lora.rank_budget={budget}"]
                recipe = parse_recipe(quickstart_recipe(task_b, str(base), args.epochs, seed, overrides))
                rows[f"{family}, budget {budget}"] = run_recipe(recipe, output=out / family, progress=False)
            for name, metrics in rows.items():
                scores.setdefault(name, []).append(metrics["val_accuracy"])
                trainable[name] = metrics["trainable_percent"]
            print(f"seed {seed}: " + ", ".join(f"{n}: {m['val_accuracy']:.3f}" for n, m in rows.items()), flush=True)
    table = {
        name: {"mean": statistics.mean(s), "stdev": statistics.pstdev(s), "min": min(s), "max": max(s),
               "trainable_percent": trainable[name]}
        for name, s in scores.items()
    }  # fmt: skip
    print(f"\n| digits 5-9, {len(args.seeds)} seeds | trainable | val. accuracy mean ± sd | min – max |")
    print("| --- | --- | --- | --- |")
    for name, r in table.items():
        print(
            f"| {name} | {r['trainable_percent']:.2f} % | {r['mean']:.3f} ± {r['stdev']:.3f} "
            f"| {r['min']:.3f} – {r['max']:.3f} |"
        )
    return table


def _lora_params(path: Path) -> int:
    """The adapter values (not the head) a run's adapter file holds."""
    file = vl.read_adapter(path)
    return sum(t.numel() for k, t in file.tensors.items() if k not in file.extra and k not in file.buffers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["speed", "quality"], default=["speed", "quality"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results: dict[str, Any] = {}
    if "speed" in args.only:
        results["speed"] = speed_table(args)
    if "quality" in args.only:
        results["quality"] = quality_table(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
