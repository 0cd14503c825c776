"""Benchmarks against PEFT and full fine-tuning, interleaved in one run; prints markdown tables, writes JSON.

    python scripts/bench.py                  # CPU: resnet50 at 128 px batch 8, a small SD-like UNet
    python scripts/bench.py --device cuda    # GPU: resnet50 at 224 px batch 64, SD-1.5-shaped UNet
    python scripts/bench.py --only resnet prefix --repeats 5 --json bench.json
    python scripts/bench.py --only unet --vs-floor --repeats 60 --per-round 1   # visionlora vs the floor alone
    python scripts/bench.py --toy --only resnet unet --compile --compile-backend aot_eager   # toy sizes (smoke)

Every contender gets the same model weights, input, rank and targets. Rounds are interleaved
(contenders A, B, C, then C, B, A, ...) so drift in the machine's speed hits all alike; each figure
is the median over rounds, and "per-round ratio" the median over rounds of a contender's time
divided by the reference's in that same round (for the UNet's ratio to the floor, with the
quartiles of those per-round ratios). "saved MB" is what autograd keeps for the backward
pass (measured with saved-tensor hooks, exact on any device); "peak MB" is CUDA's peak allocation
(GPU only).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionlora as vl

Step = Callable[[], None]

TOY = False
"""``--toy``: every model at toy sizes, on any device (scripts/gpu_check.sh --smoke: the GPU path on a CPU)."""
COMPILE_BACKEND = "inductor"
"""``--compile-backend``: torch.compile's backend for the compiled contenders."""


def saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for the backward pass of ``step()``'s loss (each storage counted once)."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


def train_step(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]
) -> tuple[Step, Callable[[], torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

    def forward() -> torch.Tensor:
        return loss_fn(model)

    def step() -> None:
        loss = forward()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, forward


def sync(device: str) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously), so a timer sees them."""
    if device == "cuda":
        torch.cuda.synchronize()


def rounds(steps: dict[str, Step], repeats: int, per_round: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each step in each round; rounds interleave the contenders, in
    alternating order so that none always runs right after the same other one."""
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def interleaved(steps: dict[str, Step], repeats: int, per_round: int, device: str) -> dict[str, float]:
    """Median seconds per call of each step, rounds interleaved across contenders."""
    return {name: statistics.median(t) for name, t in rounds(steps, repeats, per_round, device).items()}


def paired_ratios(times: dict[str, list[float]], name: str, reference: str) -> list[float]:
    """name's time / reference's time in each round (drift within a round cancels)."""
    return [a / b for a, b in zip(times[name], times[reference], strict=True)]


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of name's time / reference's time in the same round."""
    return statistics.median(paired_ratios(times, name, reference))


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself when there is one)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def peak_mb(step: Step, device: str) -> float | None:
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


# ------------------------------------------------------------------------------------------ contenders


def resnet_setup(device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[str]]:
    """The ResNet-50 benchmark: the base, a batch and its labels, and the layer4 convs every contender adapts."""
    import torchvision

    size, batch = (32, 2) if TOY else (224, 64) if device == "cuda" else (128, 8)
    torch.manual_seed(0)
    base = torchvision.models.resnet50(num_classes=10).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    targets = [n for n, m in base.named_modules() if n.startswith("layer4") and isinstance(m, nn.Conv2d)]
    return base, x, y, targets


def resnet_contenders(device: str) -> tuple[dict[str, nn.Module], Callable[[nn.Module], torch.Tensor], torch.Tensor]:
    import peft

    base, x, y, targets = resnet_setup(device)
    ours = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=targets, rank=8, alpha=8, trainable=["fc"]))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, modules_to_save=["fc"])
    )
    full = copy.deepcopy(base)
    models = {"visionlora": ours, "peft": theirs, "full fine-tuning": full}
    for m in models.values():
        m.train()
    return models, lambda m: F.cross_entropy(m(x), y), x


def unet_config(device: str) -> dict[str, Any]:
    if TOY:
        return {
            "sample_size": 8,
            "cross_attention_dim": 32,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,
            "layers_per_block": 1,
            "norm_num_groups": 32,
        }
    if device == "cuda":  # SD-1.5 shapes
        return {
            "sample_size": 64,
            "cross_attention_dim": 768,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": 8,
        }
    return {
        "sample_size": 32,
        "cross_attention_dim": 128,
        "block_out_channels": (64, 128, 256),
        "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
        "attention_head_dim": 8,
        "layers_per_block": 1,
        "norm_num_groups": 32,
    }


def unet_contenders(device: str) -> tuple[dict[str, nn.Module], Callable[[nn.Module], torch.Tensor], dict[str, Any]]:
    import diffusers
    import peft

    cfg = unet_config(device)
    batch = 4
    torch.manual_seed(0)
    base = diffusers.UNet2DConditionModel(**cfg).to(device)
    size, dim = cfg["sample_size"], cfg["cross_attention_dim"]
    inputs = {
        "sample": torch.randn(batch, 4, size, size, device=device),
        "timestep": torch.randint(0, 1000, (batch,), device=device),
        "encoder_hidden_states": torch.randn(batch, 77, dim, device=device),
    }
    target = torch.randn(batch, 4, size, size, device=device)
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    ours = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=[f"*.{t}" for t in attention], rank=4, alpha=4))
    theirs = copy.deepcopy(base)
    theirs.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=attention))
    floor = copy.deepcopy(base).requires_grad_(False)
    models = {"visionlora": ours, "peft (add_adapter)": theirs, "full fine-tuning": copy.deepcopy(base), "floor": floor}
    for m in models.values():
        m.train()

    def loss(m: nn.Module) -> torch.Tensor:
        sample = inputs["sample"].requires_grad_(m is floor)  # the floor: backward through the net, no weight grads
        return F.mse_loss(m(sample, inputs["timestep"], inputs["encoder_hidden_states"]).sample, target)

    return models, loss, inputs


# ------------------------------------------------------------------------------------------ sections


def training_table(
    models: dict[str, nn.Module], loss: Callable[[nn.Module], torch.Tensor], reference: str, args: Any
) -> dict[str, Any]:
    steps, forwards = {}, {}
    if args.compile:  # inductor; both compile as one graph (fullgraph=True) with torch 2.14 and peft 0.21
        for name in [n for n in models if n.startswith(("visionlora", "peft"))]:
            models[f"{name}, compiled"] = torch.compile(
                copy.deepcopy(models[name]), fullgraph=True, backend=COMPILE_BACKEND
            )
    for name, m in models.items():
        steps[name], forwards[name] = train_step(m, loss)
    times = rounds(steps, args.repeats, args.per_round, args.device)
    rows = {}
    for name, m in models.items():
        refs = [ref for ref in (reference, "floor") if ref in models]
        rows[name] = {
            "step_s": statistics.median(times[name]),
            "fastest_s": min(times[name]),
            "paired_ratio": {ref: paired_ratio(times, name, ref) for ref in refs},
            "paired_quartiles": {ref: quartiles(paired_ratios(times, name, ref)) for ref in refs},
            "saved_mb": None if "compiled" in name else saved_bytes(forwards[name]) / 2**20,
            "peak_mb": peak_mb(steps[name], args.device),
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
        }
    return rows


def inference_table(
    base: nn.Module, ours: nn.Module, theirs: nn.Module, call: Callable[[nn.Module], Any], args: Any
) -> dict[str, float]:
    """Median seconds of ``call(model)`` without gradients: base, both tools unmerged, ours merged."""
    merged = vl.merge_and_unload(copy.deepcopy(ours))
    models = {"base": base, "visionlora unmerged": ours, "peft unmerged": theirs, "visionlora merged": merged}
    for m in models.values():
        m.eval()

    def runner(m: nn.Module) -> Step:
        def run() -> None:
            with torch.no_grad():
                call(m)

        return run

    return interleaved({n: runner(m) for n, m in models.items()}, args.repeats, args.per_round, args.device)


def unet_io_table(ours: nn.Module, theirs: nn.Module, repeats: int) -> dict[str, float]:
    """Median seconds of merging and unmerging every adapter of the UNet (both tools), and of saving
    and loading ours; rounds interleaved."""
    import peft

    layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    times: dict[str, list[float]] = {}
    device = next(ours.parameters()).device.type

    def timed(name: str, action: Callable[[], Any]) -> Any:
        sync(device)
        start = time.perf_counter()
        result = action()
        sync(device)
        times.setdefault(name, []).append(time.perf_counter() - start)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        fresh = copy.deepcopy(ours)
        for name in vl.list_adapters(fresh):
            vl.delete_adapter(fresh, name)
        for i in range(repeats + 1):  # the first round warms up
            timed("visionlora merge", lambda: vl.merge(ours))
            timed("visionlora unmerge (exact)", lambda: vl.unmerge(ours))
            timed("peft merge", lambda: [layer.merge() for layer in layers])
            timed("peft unmerge (subtracts)", lambda: [layer.unmerge() for layer in layers])
            path = Path(tmp) / f"a{i}.safetensors"
            timed("visionlora save", functools.partial(vl.save_adapter, ours, path))
            timed("visionlora load", functools.partial(vl.load_adapter, fresh, path, adapter_name=f"loaded{i}"))
            vl.delete_adapter(fresh, f"loaded{i}")
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def quality_table(seeds: list[int], epochs: int) -> dict[str, dict[str, float]]:
    from visionlora.train.quickstart import run_quickstart

    scores: dict[str, list[float]] = {}
    trainable: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            result = run_quickstart(Path(tmp) / str(seed), epochs=epochs, seed=seed, echo=False)
            for row in result.rows:
                scores.setdefault(row["method"], []).append(row["val_accuracy"])
                trainable[row["method"]] = row["trainable_percent"]
    return {
        m: {"mean": statistics.mean(s), "stdev": statistics.pstdev(s), "trainable_percent": trainable[m]}
        for m, s in scores.items()
    }


def prefix_table(models: dict[str, nn.Module], x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per epoch over ``args.images`` images: PEFT and visionlora as they are, and visionlora
    training on cached frozen-prefix features (plus the one-time cost of caching)."""
    images = x.repeat(max(1, args.images // len(x)), 1, 1, 1)[: args.images]
    labels = torch.arange(len(images), device=x.device) % 10
    batches = list(zip(images.split(len(x)), labels.split(len(x)), strict=True))

    def epoch_of(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def epoch() -> None:
            model.train()
            for xb, yb in data:
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return epoch

    cached_model = copy.deepcopy(models["visionlora"])
    split = vl.split_frozen_prefix(cached_model)

    def cache() -> list[tuple[torch.Tensor, torch.Tensor]]:
        split.recalibrate_batchnorm(xb for xb, _ in batches)
        return [(split.features(xb), yb) for xb, yb in batches]

    sync(args.device)
    start = time.perf_counter()
    features = cache()
    sync(args.device)
    caching = time.perf_counter() - start
    steps = {
        "peft": epoch_of(models["peft"], batches),
        "visionlora": epoch_of(models["visionlora"], batches),
        "visionlora, cached prefix": epoch_of(split.rest, features),
    }
    out = interleaved(steps, args.repeats, 1, args.device)
    out["caching (once)"] = caching
    return out


def encode_table(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, float]:
    """Style-training step with latents and prompt embeddings cached (the recipe) vs encoding the
    images with the VAE and the prompts with CLIP at every step (the diffusers example scripts)."""
    import diffusers
    import transformers

    cfg = unet_config(args.device)
    gpu = args.device == "cuda"
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(  # SD's VAE shape; on CPU with narrower channels
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if gpu else (32, 64, 128, 128),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).to(args.device)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=cfg["cross_attention_dim"],
            intermediate_size=4 * cfg["cross_attention_dim"],
            num_hidden_layers=12 if gpu else 4,
            num_attention_heads=8,
            max_position_embeddings=77,
        )
    ).to(args.device)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    batch, size = 4, cfg["sample_size"] * 8
    pixels = torch.randn(batch, 3, size, size, device=args.device)
    ids = torch.randint(0, 1000, (batch, 77), device=args.device)
    unet = models["visionlora"]
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * 0.18215
        prompts = text_encoder(ids)[0]
    timesteps = torch.randint(0, 1000, (batch,), device=args.device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x0: torch.Tensor, text: torch.Tensor) -> None:
        noise = torch.randn_like(x0)
        F.mse_loss(unet(x0 + noise, timesteps, text).sample, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def encode_every_step() -> None:
        with torch.no_grad():
            x0 = vae.encode(pixels).latent_dist.sample() * 0.18215
            text = text_encoder(ids)[0]
        step(x0, text)

    steps = {"cached (visionlora recipe)": lambda: step(latents, prompts), "encode every step": encode_every_step}
    return interleaved(steps, args.repeats, args.per_round, args.device)


def _print_training(title: str, rows: dict[str, Any], reference: str) -> None:
    print(f"\n### {title}\n")
    columns = ["contender", "step (s)", f"ratio to {reference}", "per-round ratio", "saved for backward (MB)"]
    columns += ["peak (MB)", "trainable"]
    print("| " + " | ".join(columns) + " |")
    print("| --- " * len(columns) + "|")
    for name, r in rows.items():
        ratio = r["step_s"] / rows[reference]["step_s"]
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        saved = "-" if r["saved_mb"] is None else f"{r['saved_mb']:.1f}"
        paired = r["paired_ratio"][reference]
        print(f"| {name} | {r['step_s']:.3f} | {ratio:.2f} | {paired:.3f} | {saved} | {peak} | {r['trainable']:,} |")


def _print_inference(seconds: dict[str, float]) -> None:
    print("\n| inference | seconds | ratio to base |\n| --- | --- | --- |")
    for name, s in seconds.items():
        print(f"| {name} | {s:.4f} | {s / seconds['base']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["resnet", "prefix", "unet", "encode", "quality"],
        default=["resnet", "prefix", "unet", "encode", "quality"],
    )
    parser.add_argument("--images", type=int, default=64, help="prefix: images per epoch")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd contenders (GPU figure)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; figures are medians")
    parser.add_argument("--per-round", type=int, default=2, help="calls timed together in each round")
    parser.add_argument("--seeds", type=int, default=3, help="quality: quickstart seeds")
    parser.add_argument("--epochs", type=int, default=6, help="quality: quickstart epochs per phase")
    parser.add_argument(
        "--vs-floor", action="store_true", help="unet: time visionlora and the floor alone (no PEFT, full FT or I/O)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument("--toy", action="store_true", help="toy sizes on any device (a smoke run of the same path)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    args = parser.parse_args()
    global TOY, COMPILE_BACKEND
    TOY, COMPILE_BACKEND = args.toy, args.compile_backend
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "toy": TOY,
        "compile_backend": COMPILE_BACKEND if args.compile else None,
    }
    print(f"device: {report['device']}, torch {torch.__version__}")
    if "resnet" in args.only:
        models, loss, x = resnet_contenders(args.device)
        report["resnet_training"] = training_table(models, loss, "peft", args)
        _print_training("resnet50, LoRA r=8 on layer4 + new head", report["resnet_training"], "peft")
        base = copy.deepcopy(models["full fine-tuning"])
        report["resnet_inference"] = inference_table(base, models["visionlora"], models["peft"], lambda m: m(x), args)
        _print_inference(report["resnet_inference"])
    if "prefix" in args.only:
        models, _, x = resnet_contenders(args.device)
        report["prefix"] = epochs = prefix_table(models, x, args)
        print(f"\n### frozen-prefix cache: resnet50, LoRA r=8 on layer4 + head, {args.images} images per epoch\n")
        print("| epoch | seconds | PEFT / this |\n| --- | --- | --- |")
        for name in ("peft", "visionlora", "visionlora, cached prefix"):
            print(f"| {name} | {epochs[name]:.3f} | {epochs['peft'] / epochs[name]:.2f} |")
        cached = epochs["visionlora, cached prefix"]
        for n in (1, 10):
            ratio = n * epochs["peft"] / (epochs["caching (once)"] + n * cached)
            print(f"| {n} epoch(s) with caching ({epochs['caching (once)']:.2f} s once) | - | {ratio:.2f} |")
    if "unet" in args.only:
        models, loss, inputs = unet_contenders(args.device)
        reference = "floor" if args.vs_floor else "peft (add_adapter)"
        if args.vs_floor:
            models = {name: models[name] for name in ("visionlora", "floor")}
        report["unet_training"] = rows = training_table(models, loss, reference, args)
        _print_training("UNet2DConditionModel, LoRA r=4 on attention", rows, reference)
        ours, floor = rows["visionlora"], rows["floor"]
        paired, (q1, q3) = ours["paired_ratio"]["floor"], ours["paired_quartiles"]["floor"]
        print(
            f"\nvisionlora / floor: {ours['step_s'] / floor['step_s']:.3f} "
            f"(per-round ratios: median {paired:.3f}, quartiles {q1:.3f}-{q3:.3f}; "
            f"fastest rounds: {ours['fastest_s'] / floor['fastest_s']:.3f})"
        )
        if not args.vs_floor:
            report["unet_inference"] = inference_table(
                models["floor"],  # the base's weights, never trained
                models["visionlora"],
                models["peft (add_adapter)"],
                lambda m: m(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]),
                args,
            )
            _print_inference(report["unet_inference"])
            report["unet_io"] = unet_io_table(models["visionlora"], models["peft (add_adapter)"], args.repeats)
            print("\n| UNet adapter (56 layers) | ms |\n| --- | --- |")
            for name, s in report["unet_io"].items():
                print(f"| {name} | {s * 1e3:.2f} |")
    if "encode" in args.only:
        models, _, _ = unet_contenders(args.device)
        report["encode"] = enc = encode_table(models, args)
        size = unet_config(args.device)["sample_size"] * 8
        print(f"\n### style-training step, batch 4 at {size} px: cached latents and prompts vs encoding\n")
        print("| step | seconds | ratio to cached |\n| --- | --- | --- |")
        for name, sec in enc.items():
            print(f"| {name} | {sec:.3f} | {sec / enc['cached (visionlora recipe)']:.2f} |")
    if "quality" in args.only:
        report["quality"] = quality_table(list(range(args.seeds)), args.epochs)
        print("\n| quickstart task (digits 5-9) | val. accuracy, mean ± spread | trainable |\n| --- | --- | --- |")
        for method, q in report["quality"].items():
            print(f"| {method} | {q['mean']:.3f} ± {q['stdev']:.3f} | {q['trainable_percent']:.2f} % |")
        full = report["quality"]["full fine-tuning"]["mean"]
        print(f"\nLoRA / full fine-tuning accuracy: {report['quality']['LoRA + head']['mean'] / full:.3f}")
    args.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
