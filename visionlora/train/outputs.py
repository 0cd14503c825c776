"""What a finished run writes, for every task alike: adapters, exports, the merged checkpoint,
``metrics.json`` and ``report/``.

The main part's adapter is ``adapter.safetensors``; another part's is ``adapter-<part>.safetensors``
(``adapter-text-encoder.safetensors``). Each format of ``output.export`` is written under its
:meth:`~visionlora.io.formats.Format.output_name`: a pipeline format (diffusers, kohya) puts every
part in one file, a one-model format writes a file or folder per part. The run holds its folder
(see :mod:`visionlora.train.lock`), so it replaces its own earlier outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from visionlora.config import DTYPES
from visionlora.errors import ConfigError
from visionlora.io.export import export_adapter
from visionlora.io.files import write_text
from visionlora.io.formats import FORMAT_TABLE, save_adapter
from visionlora.io.merged import export_merged
from visionlora.train.recipe import Output

__all__ = ["Outputs", "check_outputs", "write_outputs"]


@dataclass
class Outputs:
    """A task's share of a run's results."""

    metrics: dict[str, Any]
    """The task's own metrics (the loop adds steps, seconds, processes and distributed)."""
    merged: str
    """The merged checkpoint's name in the output folder: a file (``merged.safetensors``) or a folder."""
    pipeline: Any = None
    """``export_merged``'s ``pipeline=`` for the merged checkpoint: a pipeline folder or a loaded pipeline."""
    plots: Mapping[str, Callable[[Path], Any]] = field(default_factory=dict)
    """``report/<name>`` -> the function that draws it to that path."""
    adapter: bool = True
    """Write the adapter and exports (False: a run without LoRA, whose result is the merged checkpoint)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Header entries for the adapter and the merged checkpoint (what prediction needs, say)."""
    variants: Mapping[str, Callable[[], ContextManager[Any]]] = field(default_factory=dict)
    """``<name>/`` -> a context in which the main model holds other weights (the best epoch's): its
    adapter and merged checkpoint are written there too."""


_ENCODERS = ("text_encoder", "text_encoder_2")


def _part_name(part: str) -> str:
    return part.replace("_", "-")


def check_outputs(output: Output, parts: dict[str, nn.Module]) -> None:
    """Refuse, before training, exports that could not hold every part of the run.

    Raises:
        ConfigError: a pipeline format for parts other than a main model and text encoders.
    """
    held = [name for name in list(parts)[1:] if name not in _ENCODERS]
    pipeline = [name for name in output.export if FORMAT_TABLE[name].pipeline]
    if held and pipeline:  # export_adapter puts text encoders beside the main model, nothing else yet
        raise ConfigError(f"output.export: {pipeline} files cannot hold the adapters of {held} yet")


def _write_adapters(out_dir: Path, output: Output, parts: dict[str, nn.Module], metadata: dict[str, str]) -> None:
    """Every part's adapter file, and each format of ``output.export``."""
    (_, main), *others = parts.items()
    save_adapter(main, out_dir / "adapter.safetensors", metadata=metadata, overwrite=True)
    for name, model in others:
        save_adapter(model, out_dir / f"adapter-{_part_name(name)}.safetensors", overwrite=True)
    for format_name in output.export:
        fmt = FORMAT_TABLE[format_name]
        if fmt.pipeline:  # one file for the whole pipeline (check_outputs: at most text encoders beside)
            export_adapter(
                main,
                out_dir / fmt.output_name(),
                format=format_name,
                text_encoder=parts.get("text_encoder"),
                text_encoder_2=parts.get("text_encoder_2"),
                overwrite=True,
            )
            continue
        for i, (name, model) in enumerate(parts.items()):
            path = out_dir / fmt.output_name(_part_name(name) if i else "")
            export_adapter(model, path, format=format_name, overwrite=True)


def write_outputs(
    accelerator: Any, out_dir: Path, output: Output, parts: dict[str, nn.Module], outputs: Outputs, metrics: dict
) -> None:
    """Write the results of a finished run (main process; every process calls this and waits).

    ``parts`` are the adapted models by part name, the main one first, whole (not sharded).
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (main_name, main), *others = parts.items()
        for model in parts.values():
            model.eval()
        if outputs.adapter:
            _write_adapters(out_dir, output, parts, outputs.metadata)

        def merge(folder: Path) -> None:
            export_merged(
                main,
                folder / outputs.merged,
                dtype=DTYPES[output.merged_dtype],
                pipeline=outputs.pipeline,
                component=main_name,  # read only with a pipeline
                others=dict(others),
                metadata=outputs.metadata,
                overwrite=True,
            )

        merge(out_dir)
        for variant, holding in outputs.variants.items():
            with holding():
                if outputs.adapter:
                    adapter = out_dir / variant / "adapter.safetensors"
                    save_adapter(main, adapter, metadata=outputs.metadata, overwrite=True)
                merge(out_dir / variant)
        for name, plot in outputs.plots.items():
            plot(out_dir / "report" / name)
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    accelerator.wait_for_everyone()
