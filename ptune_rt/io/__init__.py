"""Adapter checkpoints: PEFT's layout and the own one, safetensors only."""
from .adapters import FORMAT_VERSION, FORMATS, load_adapter, save_adapter
from .common import AdapterError

__all__ = ["AdapterError", "FORMATS", "FORMAT_VERSION", "load_adapter", "save_adapter"]
