"""The ``visionlora`` command line: argument parsing only; the work is done by the public API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from visionlora.config import LoraConfig
from visionlora.errors import ConfigError, VisionLoraError
from visionlora.inject import apply_lora
from visionlora.models.loading import SOURCES, build_model, example_input_for
from visionlora.models.presets import PRESETS, fitting_presets
from visionlora.summary import summary

__all__ = ["main"]


def _thresholds(text: str) -> dict[int, int]:
    """``"32:16,0:4"`` -> ``{32: 16, 0: 4}``."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(size): int(rank) for size, rank in pairs}
    except ValueError:
        raise ConfigError(f"--rank-by-resolution {text!r}: expected size:rank pairs, e.g. '32:16,0:4'") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a size >= 1")
    return value


def _targets(args: argparse.Namespace) -> int:
    model = build_model(args.model)
    targets = args.targets
    fits = fitting_presets(model)
    if not targets:
        usable = [p for p in fits if not PRESETS[p][1]]
        if not usable:
            raise ConfigError(f"{args.model}: no preset fits {type(model).__name__}; give --targets patterns")
        targets = [f"preset:{usable[0]}"]
    cfg = LoraConfig(
        targets=targets,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else float(args.rank),
        rank_by_resolution=_thresholds(args.rank_by_resolution) if args.rank_by_resolution else {},
        rank_budget=args.rank_budget,
        conv_groups=args.conv_groups,
    )
    apply_lora(model, cfg, example_input=example_input_for(model, args.size))
    print(f"{args.model} ({type(model).__name__}): {', '.join(targets)}")
    print(f"presets that fit: {', '.join(fits) or 'none'}\n")
    print(summary(model))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionlora", description="LoRA for vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    targets = commands.add_parser(
        "targets",
        help="show which layers a preset or pattern selects in a model, with resolutions and ranks",
        description="Build MODEL (no weights are downloaded) and show the layers the targets select.",
    )
    targets.add_argument(
        "model",
        help=f"a torchvision or timm model name, or a diffusers folder; optional source prefix: {', '.join(SOURCES)}",
    )
    targets.add_argument(
        "--targets", nargs="+", help="patterns or preset:<name>[:n] (default: the first preset that fits)"
    )
    targets.add_argument(
        "--size", type=_positive, help="image size for the probe pass (UNet: sample size); default 224 / config"
    )
    targets.add_argument("--rank", type=int, default=8, help="rank where no other rule applies (default 8)")
    targets.add_argument("--alpha", type=float, help="alpha (default: the rank)")
    targets.add_argument("--rank-by-resolution", help="size:rank thresholds, e.g. 32:16,0:4")
    targets.add_argument("--rank-budget", type=int, help="total LoRA parameters to spread over the targets")
    targets.add_argument("--conv-groups", choices=["per_group", "shared"], default="per_group")
    targets.set_defaults(run=_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 a visionlora error)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except VisionLoraError as exc:
        print(f"visionlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
