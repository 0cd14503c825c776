"""Reading and writing adapter files: atomic safetensors I/O and the visionlora format."""

from visionlora.io.adapter import AdapterFile, LayerSpec, load_adapter, read_adapter, save_adapter, write_adapter
from visionlora.io.files import read_safetensors, write_safetensors
from visionlora.io.merged import export_merged, merged_state_dict

__all__ = [
    "AdapterFile",
    "LayerSpec",
    "export_merged",
    "load_adapter",
    "merged_state_dict",
    "read_adapter",
    "read_safetensors",
    "save_adapter",
    "write_adapter",
    "write_safetensors",
]
