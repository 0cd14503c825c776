"""Reading and writing adapters: atomic safetensors I/O, the format table (visionlora, PEFT, diffusers,
kohya), loading onto a model, merged checkpoints and base weights."""

from visionlora.io.adapter import AdapterFile, Geometry, LayerSpec, read_native
from visionlora.io.convert import COMPONENTS
from visionlora.io.export import export_adapter
from visionlora.io.files import read_safetensors, write_safetensors
from visionlora.io.formats import (
    FORMAT_TABLE,
    FORMATS,
    PIPELINE_FORMATS,
    AdapterFormat,
    Format,
    file_components,
    read_adapter,
    save_adapter,
    write_adapter,
)
from visionlora.io.load import load_adapter
from visionlora.io.merged import export_merged, merged_state_dict

__all__ = [
    "COMPONENTS",
    "FORMATS",
    "FORMAT_TABLE",
    "PIPELINE_FORMATS",
    "AdapterFile",
    "AdapterFormat",
    "Format",
    "Geometry",
    "LayerSpec",
    "export_adapter",
    "export_merged",
    "file_components",
    "load_adapter",
    "merged_state_dict",
    "read_adapter",
    "read_native",
    "read_safetensors",
    "save_adapter",
    "write_adapter",
    "write_safetensors",
]
