"""The ``visionlora`` command line: argument parsing only; the work is done by the public API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from visionlora.branches import adapter_tensors
from visionlora.config import DTYPES, LoraConfig
from visionlora.errors import ConfigError, VisionLoraError
from visionlora.inject import apply_lora
from visionlora.io import (
    COMPONENTS,
    FORMATS,
    export_adapter,
    export_merged,
    file_components,
    load_adapter,
    read_adapter,
)
from visionlora.io.files import write_text
from visionlora.io.merged import merge_pipeline
from visionlora.io.report import describe_adapter, models_to_check, render
from visionlora.io.weights import fit_head, load_base
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


def _merge(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if not (Path(args.base) / "model_index.json").is_file():
        model = load_base(args.base, arch=args.arch)
        fit_head(model, read_adapter(args.adapter).tensors)
        load_adapter(model, args.adapter)
        out = export_merged(model, args.out, dtype=dtype, overwrite=args.overwrite)
        print(f"wrote {out}: {type(model).__name__} with {args.adapter} merged")
        return 0
    if args.arch is not None:
        raise ConfigError(f"--arch is for weights files; {args.base!r} is a pipeline folder")
    out, held = merge_pipeline(args.base, args.adapter, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {out}: the pipeline with {args.adapter} merged into {', '.join(held)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.against is not None:
        report = describe_adapter(args.file, models_to_check(args.against, file_components(args.file)))
        print(render(report))
        return 0 if report.loads else 1
    file = read_adapter(args.file, component=args.component)
    held = file_components(args.file)
    rows = [("layer", "kind", "resolution", "rank", "alpha", "family", "LoRA params")]
    total, grouped = 0, adapter_tensors(file.tensors)
    for name, spec in file.layers.items():
        count = sum(t.numel() for t in grouped.get(name, {}).values())
        total += count
        resolution = "-" if spec.resolution is None else str(spec.resolution)
        m = grouped.get(name, {}).get("magnitude")  # DoRA's convention: m per output (PEFT) or input channel
        family = spec.family if m is None else f"{spec.family} (m per {'out' if m.shape[0] > 1 else 'in'})"
        rows.append((name, spec.kind, resolution, str(spec.rank), f"{spec.alpha:g}", family, f"{count:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    names = " (kohya's flattened module names)" if file.flat_names else ""
    part = f" ({file.component}; the file holds {', '.join(held)})" if len(held) > 1 else ""
    report = describe_adapter(args.file)
    print(f"{file.path}: {file.format} adapter {file.adapter_name!r}{part}{names}")
    print(f"written by {report.trainer}; family: {', '.join(report.families)}")
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows))
    extra = sum(file.tensors[k].numel() for k in file.extra)
    full = f"trained in full: {extra:,} ({len(file.extra)} tensors)"
    print(f"\nLoRA layers: {len(file.layers)}   LoRA params: {total:,}   {full}")
    if file.buffers:
        print(f"buffers: {len(file.buffers)} (e.g. {file.buffers[0]})")
    print(f"config: {json.dumps(file.config.to_dict())}")
    return 0


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (a folder only if it is an earlier export)"
    )


def _add_component(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--component", choices=list(COMPONENTS), help=help)


def _convert(args: argparse.Namespace) -> int:
    out = args.out or args.out_option
    if out is None or (args.out and args.out_option):
        raise ConfigError("give the output path once: convert IN OUT --to FORMAT")
    model = models_to_check(args.model, file_components(args.file)) if args.model else None
    dtype = DTYPES[args.dtype] if args.dtype else None
    kwargs = {"dtype": dtype, "text_encoder": args.text_encoder, "component": args.component, "model": model}
    written = export_adapter(args.file, out, format=args.format, overwrite=args.overwrite, **kwargs)
    with_text = f" with the text encoder's {args.text_encoder}" if args.text_encoder else ""
    print(f"wrote {written}: {args.file}{with_text} as a {args.format} adapter")
    return 0


def _train(args: argparse.Namespace) -> int:
    from visionlora.train import load_recipe, run_recipe
    from visionlora.train.loop import is_main_process

    recipe = load_recipe(args.recipe, args.set or [])
    resume = args.resume
    metrics = run_recipe(recipe, output=args.output, resume=resume, overwrite=args.overwrite)
    if not is_main_process():  # under accelerate launch, one summary for the run
        return 0
    out = args.output or recipe.output.dir
    if "val_accuracy" in metrics:
        summary_line = (
            f"val. accuracy {metrics['val_accuracy']:.3f}, macro-F1 {metrics['val_macro_f1']:.3f}, "
            f"{metrics['trainable_percent']:.2f}% of parameters trained"
        )
    elif metrics["losses"]:
        summary_line = f"loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f} on {metrics['images']} images"
    else:
        summary_line = "nothing left to train"
    print(f"wrote {out}: {metrics['steps']} steps, {summary_line}")
    return 0


def _load_classifier(args: argparse.Namespace) -> tuple[Any, Any]:
    from visionlora.classify import load_classifier

    return load_classifier(args.model, adapter=args.adapter, arch=args.arch, size=args.size)


def _predict(args: argparse.Namespace) -> int:
    from visionlora.classify import predict, write_predictions

    model, info = _load_classifier(args)
    results = predict(model, info, args.images, top_k=args.top_k, batch_size=args.batch_size)
    if args.out is None:
        for r in results:
            print(f"{r.path}: " + ", ".join(f"{c} {p:.3f}" for c, p in zip(r.classes, r.probabilities, strict=True)))
        return 0
    write_predictions(results, Path(args.out))
    print(f"wrote {args.out}: top-{len(results[0].classes)} classes of {len(results)} images")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from visionlora.classify import evaluate
    from visionlora.train.report import plot_confusion

    model, info = _load_classifier(args)
    result = evaluate(model, info, args.folder, batch_size=args.batch_size)
    out = Path(args.out)
    write_text(out / "evaluation.json", json.dumps(result, indent=1))
    plot_confusion(torch.tensor(result["confusion"]), info.classes, out / "confusion.png")
    print(
        f"{args.folder}: {result['images']} images, accuracy {result['accuracy']:.4f}, "
        f"macro-F1 {result['macro_f1']:.4f}"
    )
    width = max(len(c) for c in result["recall"])
    for name, recall in result["recall"].items():
        print(f"  recall {name.ljust(width)}  {recall:.4f}")
    print(f"wrote {out / 'evaluation.json'} and {out / 'confusion.png'}")
    return 0


def _add_classifier(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a merged checkpoint a run wrote, a .safetensors/.pt file with --arch, or a torchvision/timm name",
    )
    parser.add_argument("--adapter", help="an adapter to load onto MODEL (a run's adapter.safetensors)")
    parser.add_argument("--arch", help="architecture of a weights file that does not name its own")
    parser.add_argument("--size", type=_positive, help="input size where no run stored one (default 224)")
    parser.add_argument("--batch-size", type=_positive, default=32)


def _quickstart(args: argparse.Namespace) -> int:
    import tempfile

    out = args.out or tempfile.mkdtemp(prefix="visionlora-quickstart-")
    if args.what == "diffusion":
        from visionlora.train.quickstart_diffusion import run_quickstart_diffusion

        steps = {} if args.steps is None else {"pretrain_steps": args.steps, "style_steps": max(1, args.steps // 4)}
        run_quickstart_diffusion(out, **steps)
        return 0
    from visionlora.train.quickstart import run_quickstart

    run_quickstart(out, epochs=args.epochs)
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

    merge = commands.add_parser(
        "merge",
        help="merge an adapter into its base and write a plain checkpoint of the original architecture",
        description="Load BASE, add the adapter, and write the merged model (merge math in float32).",
    )
    merge.add_argument(
        "--base",
        required=True,
        help="a torchvision/timm name (pretrained weights), a diffusers folder, or a .safetensors/.pt file with --arch",
    )
    merge.add_argument("--arch", help="architecture of a weights-file base, as a torchvision/timm name")
    merge.add_argument("--adapter", required=True, help="an adapter in any format visionlora reads (see inspect)")
    merge.add_argument(
        "--out",
        required=True,
        help="the .safetensors file to write; a folder for a diffusers model (a whole pipeline for a pipeline base)",
    )
    merge.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written weights (default: the base's)")
    _add_overwrite(merge)
    merge.set_defaults(run=_merge)

    inspect = commands.add_parser(
        "inspect",
        help="print an adapter file's layers, ranks, alphas, resolutions, parameter count and config",
        description="Read FILE (checked, never unpickled) and describe the adapter it holds.",
    )
    inspect.add_argument("file", help="an adapter: visionlora, diffusers or kohya file, or a PEFT folder")
    _add_component(inspect, "the part of a diffusers/kohya pipeline file to show (default: the UNet's)")
    inspect.add_argument(
        "--against",
        metavar="MODEL",
        help="a model name or local folder (a pipeline folder checks every part): print where each key would "
        "go and what would not fit, before anything is loaded; exit status 1 if the load would be refused",
    )
    inspect.set_defaults(run=_inspect)

    convert = commands.add_parser(
        "convert",
        aliases=["export"],
        help="convert an adapter between the visionlora, PEFT, diffusers and kohya formats",
        description="Read IN (any supported format) and write it to OUT in --to; layers or tensors the target "
        "format cannot hold exactly are refused by name. (`export IN --format F --out OUT` is the same command.)",
    )
    convert.add_argument("file", metavar="IN", help="an adapter: visionlora, diffusers or kohya file, or a PEFT folder")
    convert.add_argument("out", metavar="OUT", nargs="?", help="the file to write (a folder for peft)")
    convert.add_argument("--to", "--format", dest="format", required=True, choices=list(FORMATS))
    convert.add_argument("--out", dest="out_option", help=argparse.SUPPRESS)
    convert.add_argument(
        "--model",
        help="the model the adapter is for (a name or local folder; a pipeline folder for a pipeline file): maps "
        "kohya's flattened names and tells Flux from SD3 where the file alone does not",
    )
    convert.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written weights (default: as stored)")
    convert.add_argument(
        "--text-encoder",
        metavar="FILE",
        help="a text encoder's adapter to put in the same diffusers/kohya file (a pipeline LoRA)",
    )
    _add_component(convert, "convert only this part of a diffusers/kohya pipeline file (peft/visionlora need one)")
    _add_overwrite(convert)
    convert.set_defaults(run=_convert)

    train = commands.add_parser(
        "train",
        help="train an adapter from a YAML recipe (see recipes/)",
        description="Train the recipe; the output folder gets adapter.safetensors, merged.safetensors, "
        "metrics.json, recipe.yaml (fully resolved) and report/ (PNG plots). Runs unchanged under "
        "accelerate launch.",
    )
    train.add_argument("recipe", help="a recipe YAML file")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.max_steps=100 --set data.root=/data/pets (repeatable)",
    )
    train.add_argument("--output", help="output folder (default: the recipe's output.dir)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="DIR|latest",
        help="continue from the newest checkpoint of the output folder (or of DIR, or checkpoint folder DIR)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output folder that holds an earlier run (its checkpoints are removed)",
    )
    train.set_defaults(run=_train)

    predict = commands.add_parser(
        "predict",
        help="top-k classes of images with a trained classifier (class names and preprocessing from its run)",
        description="Load MODEL (and --adapter) and print each image's top-k classes and probabilities, "
        "or write them to --out (.csv or .json).",
    )
    _add_classifier(predict)
    predict.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    predict.add_argument("--top-k", type=_positive, default=5)
    predict.add_argument("--out", help="write the predictions to this .csv or .json file instead of printing them")
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy, macro-F1, per-class recall and the confusion matrix on an image folder",
        description="Load MODEL (and --adapter) and evaluate it on FOLDER (one sub-folder per class, named "
        "as the model's classes); write evaluation.json and confusion.png to --out.",
    )
    _add_classifier(evaluate)
    evaluate.add_argument("folder", help="a folder of class folders")
    evaluate.add_argument("--out", default="evaluation", help="folder for evaluation.json and confusion.png")
    evaluate.set_defaults(run=_evaluate)

    quickstart = commands.add_parser(
        "quickstart",
        help="LoRA vs head-only vs full fine-tuning on scikit-learn's bundled digits; 'diffusion': styling",
        description="classifier (default): with the classifier recipe, train a ResNet-18 on digits 0-4, adapt "
        "it to digits 5-9 four ways (head, LoRA, LoRA on a cached prefix, full), reload, merge and export the "
        "LoRA adapter (a few minutes). diffusion: pre-train a small "
        "UNet on patches of one bundled photo, LoRA-style it toward another, save base vs styled samples "
        "(a few minutes). CPU, no downloads.",
    )
    quickstart.add_argument("what", nargs="?", choices=["classifier", "diffusion"], default="classifier")
    quickstart.add_argument("--epochs", type=_positive, default=6, help="classifier: epochs per phase (default 6)")
    quickstart.add_argument(
        "--steps", type=_positive, help="diffusion: pre-training steps (styling gets a quarter; default 1500/400)"
    )
    quickstart.add_argument("--out", help="folder for the files (default: a new temporary folder)")
    quickstart.set_defaults(run=_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 a visionlora error)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except VisionLoraError as exc:
        print(f"visionlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`visionlora inspect ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
