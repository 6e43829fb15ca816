"""qlora-lite: QLoRA fine-tuning with an NF4 base, LoRA adapters, a streaming merge and a memory planner.

Heavy modules (transformers, accelerate) load lazily, so `import qlora_lite` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "QuantConfig": "config", "LoraConfig": "config", "TrainConfig": "config",
    "NF4Weight": "nf4",
    "LoRALinear4bit": "layers",
    "inject_lora": "inject", "find_targets": "inject", "count_parameters": "inject",
    "load_model": "load",
    "train": "train",
    "save_adapter": "adapter", "load_adapter": "adapter", "set_adapter": "adapter",
    "disable_adapters": "adapter", "delete_adapter": "adapter",
    "merge": "merge",
    "estimate_memory": "memory", "fit_to_budget": "memory",
    "analyze": "analysis",
    "QLoraLiteError": "errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qlora_lite' has no attribute {name!r}")
