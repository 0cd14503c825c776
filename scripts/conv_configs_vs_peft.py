"""How many random nn.Conv2d configurations come out right with visionlora and with PEFT.

Draws N random configurations of everything ``torch.nn.Conv2d`` accepts (kernel, stride, padding
as int / tuple / 'same' / 'valid', dilation, padding_mode, groups including depthwise with channel
multipliers, bias) plus a LoRA rank in 1..8 (not necessarily divisible by groups). Configurations
that torch itself refuses, at construction or at forward, are redrawn and not counted.

For each configuration and each tool, the result is "right" when all of these hold:

1. the tool accepts the configuration (no exception when adding LoRA), else "refused";
2. with A and B set to random non-zero values, the unmerged output equals the reference,
   else "unmerged wrong" (an exception in that forward counts here too);
3. merging succeeds, else "merge refused";
4. the merged output equals the reference, else "merged wrong".

The reference is written here by hand: the base conv's own geometry (padding and padding_mode,
stride, dilation, groups, bias) run on W + scale · ΔW, with scale = alpha / r and ΔW computed by
the textbook formula from the tool's own A and B tensors (never by the tool's delta function):

- visionlora: A is ``(g·r, in/g, kh, kw)``, B is ``(out, r, 1, 1)``; group j's block of ΔW is
  ``B_j @ A_j`` (rank r per group), so ΔW has the base kernel's shape ``(out, in/g, kh, kw)``.
- PEFT: A is a dense ``Conv2d(in, r, k)``, B a ``Conv2d(r, out, 1, groups=g)``; group j's block is
  ``B_j @ A_j`` with A_j the r/g rows of A that B's group j reads, over all ``in`` input channels.
  With g > 1 this ΔW is dense ``(out, in, kh, kw)``, so the reference runs the base conv's geometry
  with groups=1 on the block-diagonal expansion of W plus ΔW (the same function as the grouped
  conv on W, plus the dense ΔW branch).

"Equals" means ``max|out - ref| <= 1e-4 · max|ref|`` in float32. The first failing step names the
category; whether the merged output equals the unmerged one is recorded as well.

Run (about 5 s on 2 CPU cores for N = 200, imports included)::

    python scripts/conv_configs_vs_peft.py --n 200
    python scripts/conv_configs_vs_peft.py --n 200 --seed 1 --json /tmp/out.json

Prints a markdown table and writes a JSON file with the versions, the counts per category, every
configuration that failed for visionlora and the per-configuration outcomes for both tools.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import visionlora as vl

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
GROUP_KINDS = ("1", "2", "4", "depthwise")
ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0)
BATCH = 2
RTOL = 1e-4
CATEGORIES = ("right", "refused", "unmerged wrong", "merge refused", "merged wrong")
TOOLS = ("visionlora", "peft")
MAX_DRAWS_PER_CONFIG = 1000


@dataclass(frozen=True)
class ConvConfig:
    """nn.Conv2d constructor arguments, a LoRA rank and alpha, an input size and a tensor seed."""

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int]
    padding: int | tuple[int, int] | str
    dilation: int | tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str
    rank: int
    alpha: float
    height: int
    width: int
    tensor_seed: int

    def conv_kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "bias": self.bias,
            "padding_mode": self.padding_mode,
        }

    def repro(self) -> str:
        """Python source that rebuilds the conv, the input shape and the LoRA settings."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.conv_kwargs().items())
        return (
            f"nn.Conv2d({args}); x: ({BATCH}, {self.in_channels}, {self.height}, {self.width}); "
            f"rank={self.rank}, alpha={self.alpha:g}, tensor_seed={self.tensor_seed}"
        )

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Outcome:
    """What happened to one configuration with one tool; ``category`` is the first failing step."""

    category: str
    detail: str = ""
    unmerged_raised: bool = False
    unmerged_err: float | None = None
    merged_err: float | None = None
    merged_vs_unmerged_err: float | None = None


# ---------------------------------------------------------------------------------------------
# Random configurations


def _pair_or_int(rng: random.Random, lo: int, hi: int) -> int | tuple[int, int]:
    """An int or an (h, w) tuple, each entry in lo..hi."""
    if rng.random() < 0.5:
        return rng.randint(lo, hi)
    return (rng.randint(lo, hi), rng.randint(lo, hi))


def draw_candidate(rng: random.Random) -> ConvConfig:
    """One configuration, not yet checked against torch."""
    kind = rng.choice(GROUP_KINDS)
    if kind == "depthwise":
        in_channels = rng.randint(2, 8)
        groups = in_channels
        out_channels = in_channels * rng.randint(1, 3)  # channel multiplier
    else:
        groups = int(kind)
        in_channels = groups * rng.randint(1, 3)
        out_channels = groups * rng.randint(1, 3)
    padding_kind = rng.choice(("int", "tuple", "same", "valid"))
    padding: int | tuple[int, int] | str
    if padding_kind == "int":
        padding = rng.randint(0, 3)
    elif padding_kind == "tuple":
        padding = (rng.randint(0, 3), rng.randint(0, 3))
    else:
        padding = padding_kind
    return ConvConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=_pair_or_int(rng, 1, 5),
        stride=_pair_or_int(rng, 1, 3),
        padding=padding,
        dilation=_pair_or_int(rng, 1, 3),
        groups=groups,
        bias=rng.random() < 0.5,
        padding_mode=rng.choice(PADDING_MODES),
        rank=rng.randint(1, 8),
        alpha=rng.choice(ALPHAS),
        height=rng.randint(9, 14),
        width=rng.randint(9, 14),
        tensor_seed=rng.getrandbits(31),
    )


def build_base(cfg: ConvConfig) -> tuple[nn.Conv2d, Tensor] | None:
    """The base conv (random weights) and input, or None if torch refuses the configuration."""
    try:
        conv = nn.Conv2d(**cfg.conv_kwargs())
    except (ValueError, RuntimeError):
        return None
    gen = torch.Generator().manual_seed(cfg.tensor_seed)
    fan_in = conv.weight[0].numel()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / fan_in**0.5)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    x = torch.randn(BATCH, cfg.in_channels, cfg.height, cfg.width, generator=gen)
    try:
        with torch.no_grad():
            conv(x)
    except (ValueError, RuntimeError, NotImplementedError):
        return None
    return conv, x


def draw_config(rng: random.Random) -> ConvConfig:
    """A configuration torch accepts at construction and at forward (rejected draws are discarded)."""
    for _ in range(MAX_DRAWS_PER_CONFIG):
        cfg = draw_candidate(rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on 'same' with even kernels
            if build_base(cfg) is not None:
                return cfg
    raise RuntimeError(f"no configuration accepted by torch in {MAX_DRAWS_PER_CONFIG} draws")


# ---------------------------------------------------------------------------------------------
# Reference math, written out by hand


def reference_conv(conv: nn.Conv2d, x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The base conv's geometry (padding, padding_mode, stride, dilation, bias) on ``weight``."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding: Any = 0
    else:
        padding = conv.padding
    return F.conv2d(x, weight, conv.bias, conv.stride, padding, conv.dilation, groups)


def block_diagonal(weight: Tensor, groups: int) -> Tensor:
    """A grouped conv weight ``(out, in/g, kh, kw)`` as the equivalent dense ``(out, in, kh, kw)``."""
    out, in_per_group = weight.shape[:2]
    dense = weight.new_zeros(out, in_per_group * groups, *weight.shape[2:])
    out_per_group = out // groups
    for j in range(groups):
        rows = slice(j * out_per_group, (j + 1) * out_per_group)
        dense[rows, j * in_per_group : (j + 1) * in_per_group] = weight[rows]
    return dense


def grouped_low_rank(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """Concatenation over groups j of ``B_j @ A_j``, reshaped to ``(out, *a.shape[1:])``.

    ``a``: ``(groups · r_g, c, kh, kw)``; ``b``: ``(out, r_g, 1, 1)``. A_j is rows j·r_g:(j+1)·r_g
    of ``a`` flattened to ``(r_g, c·kh·kw)``; B_j is rows j·out/g:(j+1)·out/g of ``b``.
    """
    r_g = b.shape[1]
    out_per_group = b.shape[0] // groups
    blocks = []
    for j in range(groups):
        a_j = a[j * r_g : (j + 1) * r_g].reshape(r_g, -1)
        b_j = b[j * out_per_group : (j + 1) * out_per_group, :, 0, 0]
        blocks.append(b_j @ a_j)
    return torch.cat(blocks).reshape(b.shape[0], *a.shape[1:])


def close(out: Tensor, ref: Tensor) -> tuple[bool, float | None]:
    """(max|out - ref| <= RTOL · max|ref|, that relative error); a shape mismatch is (False, None)."""
    if out.shape != ref.shape:
        return False, None
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    rel = err / scale if scale > 0 else err
    return err <= RTOL * scale, rel


# ---------------------------------------------------------------------------------------------
# The two tools


@dataclass
class Adapted:
    """A model with one adapted conv, ready for the checks."""

    forward: Callable[[Tensor], Tensor]
    merge: Callable[[], None]
    reference: Tensor


def _randomise(params: list[Tensor], gen: torch.Generator) -> None:
    """Overwrite each tensor with non-zero normal values scaled by 1 / sqrt(fan-in)."""
    with torch.no_grad():
        for p in params:
            fan = max(p[0].numel(), 1)
            p.copy_(torch.randn(p.shape, generator=gen) / fan**0.5)


def adapt_visionlora(cfg: ConvConfig, conv: nn.Conv2d, x: Tensor, gen: torch.Generator) -> Adapted:
    model = nn.Sequential(conv)
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=cfg.rank, alpha=cfg.alpha))
    layer = model[0]
    adapter = layer.adapters["default"]
    _randomise([adapter.lora_A, adapter.lora_B], gen)
    base = layer.base
    with torch.no_grad():
        delta = grouped_low_rank(adapter.lora_A, adapter.lora_B, base.groups) * (cfg.alpha / cfg.rank)
        ref = reference_conv(base, x, base.weight + delta, base.groups)

    def merge() -> None:
        vl.merge(model)

    return Adapted(model, merge, ref)


def adapt_peft(cfg: ConvConfig, conv: nn.Conv2d, x: Tensor, gen: torch.Generator) -> Adapted:
    peft_cfg = peft.LoraConfig(target_modules=["0"], r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights=True)
    model = peft.get_peft_model(nn.Sequential(conv), peft_cfg)
    layer = model.base_model.model[0]
    a = layer.lora_A["default"].weight  # (r, in, kh, kw): a dense conv
    b = layer.lora_B["default"].weight  # (out, r / g, 1, 1): a grouped 1×1 conv
    _randomise([a, b], gen)
    base = layer.get_base_layer()
    with torch.no_grad():
        delta = grouped_low_rank(a, b, base.groups) * (cfg.alpha / cfg.rank)  # (out, in, kh, kw)
        if base.groups == 1:
            ref = reference_conv(base, x, base.weight + delta, 1)
        else:
            ref = reference_conv(base, x, block_diagonal(base.weight, base.groups) + delta, 1)

    def merge() -> None:
        model.merge_adapter()

    return Adapted(model, merge, ref)


ADAPTERS: dict[str, Callable[[ConvConfig, nn.Conv2d, Tensor, torch.Generator], Adapted]] = {
    "visionlora": adapt_visionlora,
    "peft": adapt_peft,
}


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def evaluate(cfg: ConvConfig, tool: str) -> Outcome:
    """Run the four checks for one configuration and one tool."""
    gen = torch.Generator().manual_seed(cfg.tensor_seed + 1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # peft's groups / rank notes, visionlora's rank notes, torch's notes
        built = build_base(cfg)
        assert built is not None, "draw_config only returns configurations torch accepts"
        conv, x = built
        try:
            adapted = ADAPTERS[tool](cfg, copy.deepcopy(conv), x, gen)
        except Exception as exc:
            return Outcome("refused", _short(exc))
        outcome = Outcome("right")
        unmerged: Tensor | None = None
        try:
            unmerged = adapted.forward(x)
            ok, outcome.unmerged_err = close(unmerged, adapted.reference)
            if outcome.unmerged_err is None:
                outcome.detail = f"unmerged output shape {tuple(unmerged.shape)} != {tuple(adapted.reference.shape)}"
        except Exception as exc:
            ok, outcome.unmerged_raised, outcome.detail = False, True, _short(exc)
        if not ok:
            outcome.category = "unmerged wrong"
        try:
            adapted.merge()
        except Exception as exc:
            if outcome.category == "right":
                outcome.category, outcome.detail = "merge refused", _short(exc)
            return outcome
        try:
            merged = adapted.forward(x)
        except Exception as exc:
            if outcome.category == "right":
                outcome.category, outcome.detail = "merged wrong", _short(exc)
            return outcome
        ok, outcome.merged_err = close(merged, adapted.reference)
        if unmerged is not None:
            outcome.merged_vs_unmerged_err = close(merged, unmerged)[1]
        if not ok and outcome.category == "right":
            outcome.category = "merged wrong"
    return outcome


# ---------------------------------------------------------------------------------------------
# Report


def markdown_table(counts: dict[str, Counter[str]], versions: dict[str, str], n: int) -> str:
    header = ["tool", "version", *CATEGORIES]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for tool in TOOLS:
        cells = [tool, versions[tool], *(f"{counts[tool][c]} / {n}" for c in CATEGORIES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(configs: list[ConvConfig], outcomes: dict[str, list[Outcome]]) -> dict[str, Any]:
    """Counts per category plus the extra tallies recorded for each tool."""
    out: dict[str, Any] = {}
    for tool in TOOLS:
        results = outcomes[tool]
        by_groups: dict[str, Counter[str]] = {}
        by_padding_mode: dict[str, Counter[str]] = {}
        for cfg, o in zip(configs, results, strict=True):
            by_groups.setdefault("groups=1" if cfg.groups == 1 else "groups>1", Counter())[o.category] += 1
            by_padding_mode.setdefault(cfg.padding_mode, Counter())[o.category] += 1
        details = Counter(re.sub(r"\b\d+\b", "N", o.detail) for o in results if o.detail)
        out[tool] = {
            "counts": {c: sum(o.category == c for o in results) for c in CATEGORIES},
            "unmerged_forward_raised": sum(o.unmerged_raised for o in results),
            # merge succeeded, and the merged output differs from the unmerged one (or that one raised)
            "merged_differs_from_unmerged": sum(
                o.merged_err is not None and (o.merged_vs_unmerged_err is None or o.merged_vs_unmerged_err > RTOL)
                for o in results
            ),
            "by_groups": {k: dict(v) for k, v in sorted(by_groups.items())},
            "by_padding_mode": {k: dict(v) for k, v in sorted(by_padding_mode.items())},
            "failure_details": dict(details.most_common()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of configurations (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the configuration sampler (default 0)")
    parser.add_argument("--json", type=Path, default=Path("conv_configs_vs_peft.json"), help="JSON output path")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rng = random.Random(args.seed)
    configs = [draw_config(rng) for _ in range(args.n)]
    outcomes: dict[str, list[Outcome]] = {tool: [evaluate(cfg, tool) for cfg in configs] for tool in TOOLS}
    elapsed = time.perf_counter() - start

    versions = {"torch": torch.__version__, "peft": peft.__version__, "visionlora": vl.__version__}
    counts = {tool: Counter(o.category for o in outcomes[tool]) for tool in TOOLS}
    tool_versions = {"visionlora": vl.__version__, "peft": peft.__version__}
    print(f"{args.n} random nn.Conv2d configurations (seed {args.seed}), torch {torch.__version__}:\n")
    print(markdown_table(counts, tool_versions, args.n))

    vl_failures = [
        {"index": i, "config": cfg.to_json(), "repro": cfg.repro(), **dataclasses.asdict(o)}
        for i, (cfg, o) in enumerate(zip(configs, outcomes["visionlora"], strict=True))
        if o.category != "right"
    ]
    if vl_failures:
        print(f"\nvisionlora failures ({len(vl_failures)}):")
        for f in vl_failures:
            print(f"- #{f['index']} {f['category']}: {f['repro']} {f['detail']}")
    else:
        print("\nvisionlora: no failures.")

    report = {
        "n": args.n,
        "seed": args.seed,
        "tolerance": f"max|out - ref| <= {RTOL:g} * max|ref| (float32)",
        "versions": versions,
        "elapsed_s": round(elapsed, 2),
        "summary": summarise(configs, outcomes),
        "visionlora_failures": vl_failures,
        "configs": [
            {"config": cfg.to_json(), **{tool: dataclasses.asdict(outcomes[tool][i]) for tool in TOOLS}}
            for i, cfg in enumerate(configs)
        ],
    }
    args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {args.json} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
