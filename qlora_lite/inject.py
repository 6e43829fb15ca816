"""Model surgery as plain functions: find target linears, swap in LoRA layers, freeze, count.

Targets are named the way PEFT names them: `"all-linear"` (every `nn.Linear` except the output
projection), a list of module-name suffixes (`["q_proj", "v_proj"]`), or a regex matched against
the full module path. Mixture-of-experts projections (3-D parameters, experts.py) are PEFT's
`target_parameters`: `find_expert_targets`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraConfig, QuantConfig, resolve_lora_dtype
from .errors import ConfigError
from .experts import (PROJECTIONS, LoRAExpertProjection4bit, LoRAExperts4bit, fused_experts_modules,
                      unsupported_expert_parameters)
from .init import Initialised, initialise, needs_weight
from .layers import DEFAULT_ADAPTER, LoRALinear4bit
from .nf4 import NF4Weight

__all__ = [
    "ParameterCount",
    "linear_module_names",
    "find_targets",
    "find_expert_targets",
    "make_experts_layer",
    "quantize_expert",
    "check_experts",
    "replace_module",
    "make_lora_layer",
    "quantize_target",
    "inject_lora",
    "freeze_base",
    "lora_layers",
    "count_parameters",
]


def _output_projection_names(model: nn.Module) -> set[str]:
    """The LM head is never a target: it is tied to embeddings in many models and QLoRA keeps it 16-bit."""
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {name for name, module in model.named_modules() if module is head}
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Full paths of every linear layer (plain or already LoRA-wrapped), in model order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear4bit))]


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Resolve a target spec to module paths; a spec that matches nothing lists what exists."""
    linears = linear_module_names(model)
    heads = _output_projection_names(model)
    if target_modules == "all-linear":
        found = [n for n in linears if n not in heads and n.rsplit(".", 1)[-1] not in heads]
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        found = [n for n in linears if pattern.fullmatch(n) or pattern.fullmatch(n.rsplit(".", 1)[-1])]
    else:
        wanted = list(target_modules)
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in wanted)]
        unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linears)]
        if found and unmatched:
            raise ConfigError(_no_match_message(unmatched, linears), "target_modules")
    if not found:
        conv1d = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"})
        if conv1d:  # GPT-2 and kin keep their projections in transformers' Conv1D (a transposed linear)
            raise ConfigError(f"this model's projections {conv1d} are GPT-2-style Conv1D layers, which qlora-lite "
                              "does not quantize or adapt; use a model with nn.Linear projections (Llama, Qwen, "
                              "Mistral, Gemma, ...)", "model")
        raise ConfigError(_no_match_message(target_modules, linears), "target_modules")
    return found


def find_expert_targets(model: nn.Module, lora: LoraConfig) -> list[str]:
    """The expert projections `lora` adapts, as "<experts module>.<gate_up_proj|down_proj>" paths.

    `target_parameters=None`: all of them when `target_modules` is "all-linear", else none; a list
    matches PEFT's way (the path or a "."-suffix of it), and a name that matches nothing is an error.
    """
    names = [f"{m}.{p}" for m in fused_experts_modules(model) for p in PROJECTIONS]
    wanted = lora.target_parameters
    if wanted is None:
        return names if lora.target_modules == "all-linear" else []
    unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        kinds = sorted({".".join(n.rsplit(".", 3)[-3:]) for n in names})  # e.g. mlp.experts.down_proj
        raise ConfigError(f"target_parameters {unmatched} match no expert projection; "
                          + (f"this model's are {kinds[:4]}" if names else "this model has no mixture-of-experts "
                             "layers"), "target_parameters")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]


def check_experts(model: nn.Module, lora: LoraConfig | None, expert_targets: list[str]) -> None:
    odd = unsupported_expert_parameters(model)
    if odd:
        raise ConfigError(f"{odd[0]} (and {len(odd) - 1} more) is a {model.get_parameter(odd[0]).dim()}-D expert "
                          "parameter in a layout qlora-lite does not quantize or adapt (only transformers' fused "
                          "experts with 3-D gate_up_proj and down_proj, as in Mixtral and Qwen3-MoE)", "model")
    if expert_targets and lora is not None:
        if lora.lora_dropout:
            raise ConfigError(f"lora_dropout={lora.lora_dropout}: LoRA on experts takes no dropout (PEFT's parameter "
                              "targets refuse it); set lora_dropout: 0, or target_parameters: [] to leave the "
                              "experts unadapted", "LoraConfig")
        if lora.use_dora or needs_weight(lora.init_lora_weights):
            raise ConfigError(f"{'use_dora' if lora.use_dora else 'init_lora_weights=' + lora.init_lora_weights} is "
                              "not available on experts (nor in PEFT's parameter targets); set "
                              "target_parameters: [] to adapt only the linears", "LoraConfig")


def quantize_expert(w0: torch.Tensor, quant: QuantConfig, name: str) -> NF4Weight:
    """One expert's matrix as its own NF4 weight: the format and bytes of a linear's."""
    return NF4Weight.from_tensor(w0, quant.blocksize, quant.double_quant, quant.backend, name=name)


def make_experts_layer(bases: dict[str, torch.Tensor | list[NF4Weight]], act_fn: nn.Module, lora: LoraConfig | None,
                       adapted: set[str], compute_dtype: torch.dtype = torch.float32) -> LoRAExperts4bit:
    """A `LoRAExperts4bit` from each projection's bases (one NF4Weight per expert, or the 3-D 16-bit
    tensor of a LoRA control run), with adapters on the projections in `adapted`."""
    projections = {}
    for proj in PROJECTIONS:
        layer = LoRAExpertProjection4bit(bases[proj])
        if lora is not None and proj in adapted:
            layer.add_adapter(DEFAULT_ADAPTER, lora.r, lora.lora_alpha, use_rslora=lora.use_rslora,
                              init_lora_weights=lora.init_lora_weights,
                              dtype=resolve_lora_dtype(lora.lora_dtype, compute_dtype, layer.device))
        projections[proj] = layer
    return LoRAExperts4bit(projections["gate_up_proj"], projections["down_proj"], act_fn)


def _no_match_message(spec, linears: list[str]) -> str:
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if not kinds:
        return f"{spec!r} matches nothing: this model has no nn.Linear layers to adapt"
    return f"{spec!r} matches no linear layer; this model's linear layers are named {kinds}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_target(w0: torch.Tensor, quant: QuantConfig, lora: LoraConfig | None, name: str,
                    backend: str | None = None) -> NF4Weight | Initialised:
    """The NF4 base of one linear: NF4(W0), or for a LoftQ/PiSSA target that base with its A and B."""
    backend = quant.backend if backend is None else backend
    if lora is not None and needs_weight(lora.init_lora_weights):
        return initialise(w0, lora.init_lora_weights, lora.r, lora.scaling, quant.blocksize, quant.double_quant,
                          backend, lora.loftq_iter, name=name)
    return NF4Weight.from_tensor(w0, quant.blocksize, quant.double_quant, backend, name=name)


def make_lora_layer(base: NF4Weight | torch.Tensor | Initialised, bias: torch.Tensor | None, lora: LoraConfig | None,
                    adapter_name: str = DEFAULT_ADAPTER, compute_dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None) -> LoRALinear4bit:
    """A LoRA layer on `base` (NF4, or a plain 16-bit weight); with `lora=None` a frozen linear with no adapter.
    `compute_dtype` and `device` (the base's when None) decide `lora_dtype="auto"` (resolve_lora_dtype).
    An `Initialised` base (LoftQ/PiSSA, `quantize_target`) brings its A and B; the layer is then marked
    `own_base`: the base it trains on is not NF4(W0) and is saved beside the adapter."""
    initialised = base if isinstance(base, Initialised) else None
    if initialised is not None:
        base = initialised.base
    if lora is None:
        return LoRALinear4bit(base, bias, adapter_name=None)
    if initialised is None and needs_weight(lora.init_lora_weights):
        raise ConfigError(f"init_lora_weights={lora.init_lora_weights!r} needs an NF4 base (quant) to initialise "
                          "from; use kaiming for 16-bit LoRA", "LoraConfig")
    lora_dtype = resolve_lora_dtype(lora.lora_dtype, compute_dtype, base.device if device is None else device)
    layer = LoRALinear4bit(base, bias, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                           use_rslora=lora.use_rslora,
                           init_lora_weights="zeros" if initialised else lora.init_lora_weights,
                           lora_dtype=lora_dtype, adapter_name=adapter_name, use_dora=lora.use_dora)
    if initialised is not None:
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(initialised.lora_A)
            layer.lora_B[adapter_name].copy_(initialised.lora_B)
        if lora.use_dora:
            layer.reset_magnitude(adapter_name)
        layer.own_base = True
    return layer


def inject_lora(model: nn.Module, lora: LoraConfig, quant: QuantConfig | None = QuantConfig()) -> list[str]:
    """Swap the linears of an in-memory model for LoRA layers (quantizing every linear but the head).

    Like QLoRA, all linears are stored NF4 when `quant` is given, adapters go on the targets only.
    Mixture-of-experts layers are swapped for `LoRAExperts4bit` (every expert NF4) and adapted on
    `find_expert_targets`. Returns the adapted module paths (an expert projection's is
    "<experts>.gate_up_proj"). `load.load_model` does the same while streaming from disk.
    """
    expert_targets = find_expert_targets(model, lora)
    check_experts(model, lora, expert_targets)
    for name, experts in fused_experts_modules(model).items():
        adapted = {t.rpartition(".")[2] for t in expert_targets if t.rpartition(".")[0] == name}
        if isinstance(experts, LoRAExperts4bit) or not (quant is not None or adapted):
            continue
        weights = {p: getattr(experts, p).detach() for p in PROJECTIONS}
        bases = {p: [quantize_expert(w[e], quant, f"{name}.{p}[{e}]") for e in range(len(w))]
                 if quant is not None else w for p, w in weights.items()}
        replace_module(model, name, make_experts_layer(bases, experts.act_fn, lora, adapted,
                                                       weights["gate_up_proj"].dtype))
    targets = set(find_targets(model, lora.target_modules))
    to_replace = find_targets(model, "all-linear") if quant is not None else sorted(targets)
    for name in to_replace:
        linear = model.get_submodule(name)
        if isinstance(linear, LoRALinear4bit):
            continue
        if quant is not None:
            base = quantize_target(linear.weight.detach(), quant, lora if name in targets else None, f"{name}.weight")
        else:
            base = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        replace_module(model, name, make_lora_layer(base, bias, lora if name in targets else None,
                                                    compute_dtype=linear.weight.dtype))
    freeze_base(model)
    return [n for n in to_replace if n in targets] + expert_targets


def freeze_base(model: nn.Module) -> None:
    """Only LoRA A/B (and DoRA's magnitudes) train; embeddings, norms, heads and biases stay frozen."""
    trained = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")
    for name, param in model.named_parameters():
        param.requires_grad_(any(part in f".{name}" for part in trained))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear4bit | LoRAExpertProjection4bit]:
    """Every layer that can carry adapters, by path: linears, and expert projections ("<experts>.down_proj")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear4bit, LoRAExpertProjection4bit))}


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int
    quantized: int  # parameters stored as NF4 (counted by value, not by packed byte)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} / total {self.total:,} ({100 * self.trainable_fraction:.3f}%), "
                f"{self.quantized:,} stored NF4")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts by parameter value; a tied embedding/head is counted once.

    An NF4 weight counts its values (`NF4Weight.numel`), not its packed bytes and scales, so the count
    is the model's size whether the storage is whole, sharded by FSDP or on the meta device
    (a DTensor's numel is the whole tensor's).
    """
    storage = [m for m in model.modules() if isinstance(m, NF4Weight)]
    seen: set[int] = {id(p) for m in storage for p in m.parameters()}
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    quantized = sum(m.numel for m in storage)
    return ParameterCount(trainable, total + quantized, quantized)
