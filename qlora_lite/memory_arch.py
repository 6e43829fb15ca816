"""What the memory planner reads off a model config: the shapes, and a refusal for what it cannot plan.

`load_model_config` accepts a `PretrainedConfig`, a built-in shape name (qlora_lite/configs), a
config.json or a model directory; `model_shape` builds the model on the meta device (exact
parameter counts for any architecture) and refuses, in one line, what the activation formula does
not describe: encoders (BERT), state-space models (Mamba), configs with no attention heads, and
mixture-of-experts layouts other than transformers' fused experts (3-D `gate_up_proj`/`down_proj`
beside a router, as in Mixtral and Qwen3-MoE: experts.py), e.g. shared experts. `parse_budget` reads
"24GB", "24GiB" or a GPU name.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .shards import size_bytes

__all__ = ["GiB", "GB", "GPU_MEMORY", "builtin_configs", "load_model_config", "model_shape", "parse_budget",
           "ModelShape"]

GiB, GB = 1024**3, 10**9
_CONFIG_DIR = Path(__file__).parent / "configs"
# Nominal memory per GPU (the driver shows a little less, e.g. 79.6 GiB on an H100: the CUDA context
# term of the estimate covers it).
GPU_MEMORY: dict[str, int] = {name: int(gib * GiB) for name, gib in {
    "T4": 16, "P100": 16, "V100-16GB": 16, "V100-32GB": 32, "A10": 24, "A10G": 24, "L4": 24, "A40": 48,
    "A6000": 48, "L40S": 48, "RTX6000Ada": 48, "RTX3060": 12, "RTX3080": 10, "RTX3090": 24, "RTX4060Ti-16GB": 16,
    "RTX4070Ti": 12, "RTX4080": 16, "RTX4090": 24, "RTX5090": 32, "A100-40GB": 40, "A100-80GB": 80, "H100": 80,
    "H100-NVL": 94, "H200": 141, "B200": 180, "MI300X": 192}.items()}
_GATE_NAMES = {"gate_proj", "gate_up_proj", "w3"}
# config keys that give a mixture-of-experts MLP (Mixtral, Qwen-MoE, DeepSeek, DBRX, OLMoE, ...)
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def builtin_configs() -> list[str]:
    """Names of the config.json files shipped in qlora_lite/configs (e.g. "llama-2-7b")."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def load_model_config(config: Any) -> tuple[Any, str]:
    """(PretrainedConfig, display name) from a config object, a built-in name, a config.json or a model dir."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config, getattr(config, "name_or_path", "") or config.model_type
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"model config must be a PretrainedConfig, a name or a path, not {type(config).__name__}")
    text, path = str(config), Path(config)
    if text in builtin_configs():
        path = _CONFIG_DIR / f"{text}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{text!r} is not a built-in model{_did_you_mean(text, builtin_configs())} "
                          f"({', '.join(builtin_configs())}), a config.json file or a model directory with one",
                          "model")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})", "model") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config.json holds a JSON object, not {type(data).__name__}", "model")
    bad = [f"{k}={data[k]!r} must be a positive integer" for k in ("hidden_size", "num_hidden_layers",
           "num_attention_heads", "vocab_size") if k in data and not (isinstance(data[k], int) and data[k] > 0)]
    if bad:  # before transformers divides by it
        raise ConfigError([f"{path}: {b}" for b in bad], "model for the memory planner")
    model_type = data.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **data), text if path.parent == _CONFIG_DIR else str(config)
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        raise ConfigError(f"{path}: not a transformers config.json ({exc})", "model") from None


def _refusal(cfg: Any) -> str | None:
    """Why the planner cannot plan this config, or None: it plans pre-norm decoder-only transformers."""
    kind = getattr(cfg, "model_type", "?")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "is_encoder_decoder", False):
        return f"model_type {kind!r} is an encoder-decoder model; the planner plans decoder-only causal LMs"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(text, key, None)
        if value is None and key == "num_attention_heads":
            return (f"model_type {kind!r} has no attention heads (num_attention_heads is missing: a "
                    "state-space or recurrent model such as Mamba?); the planner plans attention decoders")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"{key}={value!r} in the model config must be a positive integer"
    if text.hidden_size % text.num_attention_heads and getattr(text, "head_dim", None) is None:
        return (f"hidden_size={text.hidden_size} is not divisible by num_attention_heads="
                f"{text.num_attention_heads} and no head_dim is given")
    return None


@dataclass(eq=False)
class ModelShape:
    """What the estimate needs from a model, read off its meta-device instance."""

    model: Any
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    total: int  # base parameters, a tied embedding/head counted once
    linears: dict[str, tuple[int, int]]  # every linear but the head: name -> (out, in)
    layer_params: int  # parameters inside decoder layer 0
    gated: bool
    head_params: int  # the LM head's weight (the embedding's when tied)
    tied: bool
    experts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # "<experts>.<proj>" -> (E, out, in)
    top_k: int = 0  # experts each token is routed to (0: no mixture-of-experts layer)
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def target_names(self, spec: str | list[str]) -> tuple[str, ...]:
        from .inject import find_targets

        key = json.dumps(spec)
        if key not in self.targets:
            self.targets[key] = tuple(find_targets(self.model, spec))
        return self.targets[key]

    def expert_target_names(self, lora: Any) -> tuple[str, ...]:
        """The expert projections `lora` adapts (inject.find_expert_targets)."""
        from .inject import find_expert_targets

        key = json.dumps([lora.target_modules, lora.target_parameters])
        if key not in self.targets:
            self.targets[key] = tuple(find_expert_targets(self.model, lora))
        return self.targets[key]

    @property
    def matrices(self) -> dict[str, tuple[int, int, int]]:
        """Every matrix stored NF4: linears (one each) and expert projections (one per expert), as
        name -> (count, out, in)."""
        return {**{n: (1, o, i) for n, (o, i) in self.linears.items()}, **self.experts}

    def representative_layers(self) -> list[int]:
        """The first dense layer and the first mixture-of-experts layer: the kinds of block there are."""
        moe = sorted({layer_index(n) for n in self.experts})
        dense = [i for i in range(self.layers) if i not in moe]
        return [*dense[:1], *moe[:1]]


def layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}")
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=16)
def _shape_from_json(config_json: str, model_type: str) -> ModelShape:
    from transformers import AutoConfig

    from .inject import find_targets
    from .load import meta_model

    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in json.loads(config_json).items() if k != "model_type"})
    try:
        model = meta_model(cfg)
    except ValueError as exc:  # no causal-LM class for this model type
        raise ConfigError(f"model_type {model_type!r} has no causal-LM class in transformers ({exc})".splitlines()[0],
                          "model") from None
    if not type(model).__name__.endswith("ForCausalLM"):  # e.g. BertLMHeadModel: an encoder with a head
        raise ConfigError(f"model_type {model_type!r} ({type(model).__name__}) is not a decoder-only causal LM; "
                          "the planner plans decoder-only transformers", "model")
    model.tie_weights()  # init_empty_weights skips the tying that a real instantiation does
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    experts = _expert_shapes(model, text, model_type)
    linears = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
               for n in find_targets(model, "all-linear")}
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    layer0 = sum(p.numel() for n, p in model.named_parameters() if layer_index(n) == 0)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    heads = text.num_attention_heads
    return ModelShape(model, text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                      text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads,
                      getattr(text, "head_dim", None) or text.hidden_size // heads, text.vocab_size, total, linears,
                      layer0, any(n.rsplit(".", 1)[-1] in _GATE_NAMES for n in linears),
                      head.weight.numel() if head is not None else 0, tied, experts,
                      getattr(text, "num_experts_per_tok", 0) if experts else 0)


def _expert_shapes(model: Any, text: Any, model_type: str) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of every fused expert projection; a ConfigError for expert layouts the
    planner cannot count (the activation formula knows router + fused experts blocks only)."""
    from .experts import PROJECTIONS, fused_experts_modules, unsupported_expert_parameters

    odd = unsupported_expert_parameters(model)
    found = {k: getattr(text, k) for k in _MOE_KEYS if isinstance(getattr(text, k, None), int)}
    modules = fused_experts_modules(model)
    if odd or (any(v > 1 for v in found.values()) and not modules):
        what = f"{odd[0]} is a {model.get_parameter(odd[0]).dim()}-D parameter" if odd else \
            ", ".join(f"{k}={v}" for k, v in found.items())
        raise ConfigError(f"model_type {model_type!r} is a mixture-of-experts model ({what}) in a layout the planner "
                          "does not count: only transformers' fused experts (3-D gate_up_proj and down_proj beside "
                          "a router, as in Mixtral and Qwen3-MoE)", "model for the memory planner")
    for name in modules:
        block = model.get_submodule(name.rpartition(".")[0])
        extra = [n for n, _ in block.named_children() if n not in ("gate", "experts")]
        if extra or not isinstance(getattr(text, "num_experts_per_tok", None), int):
            raise ConfigError(f"model_type {model_type!r}: the mixture-of-experts block {name.rpartition('.')[0]} "
                              f"has {extra or 'no num_experts_per_tok'} besides its router and experts (shared "
                              "experts?), which the planner does not count", "model for the memory planner")
    return {f"{m}.{p}": tuple(getattr(mod, p).shape) for m, mod in modules.items() for p in PROJECTIONS}


def model_shape(cfg: Any) -> ModelShape:
    """The shapes of `cfg`'s model; a ConfigError (one line) for a model the planner cannot plan."""
    reason = _refusal(cfg)
    if reason:
        raise ConfigError(reason, "model for the memory planner")
    return _shape_from_json(cfg.to_json_string(use_diff=False), cfg.model_type)


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def parse_budget(budget: str | int | float) -> int:
    """Bytes from "24GB" (10⁹), "24GiB" (2³⁰), "1500MiB", a GPU name from GPU_MEMORY ("RTX4090") or a number."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0 or not math.isfinite(budget):
            raise ConfigError(f"memory budget {budget!r} must be a positive number of bytes", "memory budget")
        return int(budget)
    if not isinstance(budget, str):
        raise ConfigError(f"memory budget must be a size or a GPU name, not {type(budget).__name__}", "memory budget")
    size = size_bytes(budget, unit_required=True)
    if size is not None:
        return size
    gpus = {_squash(k): v for k, v in GPU_MEMORY.items()}
    if _squash(budget) in gpus:
        return gpus[_squash(budget)]
    if budget.strip()[:1] in tuple("0123456789."):
        raise ConfigError(f"memory budget {budget!r}: give a positive size with a unit, e.g. '24GB' or '24GiB'",
                          "memory budget")
    close = difflib.get_close_matches(_squash(budget), list(gpus), n=3, cutoff=0.5)
    names = [k for k in GPU_MEMORY if _squash(k) in close]
    hint = f" (did you mean {' or '.join(names)}?)" if names else ""
    raise ConfigError(f"unknown GPU {budget!r}{hint}; known GPUs: {', '.join(GPU_MEMORY)}; "
                      "or give a size such as '24GB' or '24GiB'", "memory budget")
