"""qlora-lite: QLoRA fine-tuning with an NF4 base, LoRA adapters, a streaming merge and a memory planner."""

from __future__ import annotations

import importlib

# `train` and `merge` are not re-exported: they share their names with their modules, and binding
# the functions here would shadow `qlora_lite.train` / `qlora_lite.merge` for `import ... as`.
# Use `from qlora_lite.train import train` and `from qlora_lite.merge import merge`.
from .adapter import delete_adapter, disable_adapters, load_adapter, save_adapter, set_adapter
from .config import LoraConfig, QuantConfig, TrainConfig
from .errors import QLoraLiteError
from .inject import count_parameters, find_targets, inject_lora
from .layers import LoRALinear4bit
from .load import load_model
from .nf4 import NF4Weight

__version__ = "0.1.0"

# The planner and the analyses are imported on first use: `import qlora_lite` (every CLI command, every
# training process) does not pay for modules it may never call.
_ON_FIRST_USE = {"analyze": "analysis", "estimate_memory": "memory", "fit_to_budget": "memory_fit"}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LoRALinear4bit", "LoraConfig", "NF4Weight", "QLoraLiteError", "QuantConfig", "TrainConfig", "analyze",
    "count_parameters", "delete_adapter", "disable_adapters", "estimate_memory", "find_targets", "fit_to_budget",
    "inject_lora", "load_adapter", "load_model", "save_adapter", "set_adapter", "__version__",
]
