"""Reading and writing adapters: atomic safetensors I/O, the visionlora format, PEFT, diffusers and kohya."""

from visionlora.io.adapter import AdapterFile, Geometry, LayerSpec, read_native, save_adapter, write_adapter
from visionlora.io.convert import COMPONENTS
from visionlora.io.files import read_safetensors, write_safetensors
from visionlora.io.formats import FORMATS, PIPELINE_FORMATS, export_adapter, file_components, read_adapter
from visionlora.io.load import load_adapter
from visionlora.io.merged import export_merged, merged_state_dict

__all__ = [
    "COMPONENTS",
    "FORMATS",
    "PIPELINE_FORMATS",
    "AdapterFile",
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
