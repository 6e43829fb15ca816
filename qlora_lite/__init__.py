"""qlora-lite: QLoRA fine-tuning with an NF4 base, LoRA adapters, a streaming merge and a memory planner."""

from __future__ import annotations

# `train` and `merge` are not re-exported: they share their names with their modules, and binding
# the functions here would shadow `qlora_lite.train` / `qlora_lite.merge` for `import ... as`.
# Use `from qlora_lite.train import train` and `from qlora_lite.merge import merge`.
from .adapter import delete_adapter, disable_adapters, load_adapter, save_adapter, set_adapter
from .analysis import analyze
from .config import LoraConfig, QuantConfig, TrainConfig
from .errors import QLoraLiteError
from .inject import count_parameters, find_targets, inject_lora
from .layers import LoRALinear4bit
from .load import load_model
from .memory import estimate_memory, fit_to_budget
from .nf4 import NF4Weight

__version__ = "0.1.0"

__all__ = [
    "LoRALinear4bit", "LoraConfig", "NF4Weight", "QLoraLiteError", "QuantConfig", "TrainConfig", "analyze",
    "count_parameters", "delete_adapter", "disable_adapters", "estimate_memory", "find_targets", "fit_to_budget",
    "inject_lora", "load_adapter", "load_model", "save_adapter", "set_adapter", "__version__",
]
