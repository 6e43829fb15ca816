"""qlora-lite: QLoRA fine-tuning with an NF4 base, LoRA adapters, a streaming merge and a memory planner."""

from __future__ import annotations

# Bound eagerly: `train` and `merge` share their names with their modules, and a lazy attribute
# would be shadowed by the submodule as soon as anything imported it.
from .adapter import delete_adapter, disable_adapters, load_adapter, save_adapter, set_adapter
from .analysis import analyze
from .config import LoraConfig, QuantConfig, TrainConfig
from .errors import QLoraLiteError
from .inject import count_parameters, find_targets, inject_lora
from .layers import LoRALinear4bit
from .load import load_model
from .memory import estimate_memory, fit_to_budget
from .merge import merge
from .nf4 import NF4Weight
from .train import train

__version__ = "0.1.0"

__all__ = [
    "LoRALinear4bit", "LoraConfig", "NF4Weight", "QLoraLiteError", "QuantConfig", "TrainConfig", "analyze",
    "count_parameters", "delete_adapter", "disable_adapters", "estimate_memory", "find_targets", "fit_to_budget",
    "inject_lora", "load_adapter", "load_model", "merge", "save_adapter", "set_adapter", "train", "__version__",
]
