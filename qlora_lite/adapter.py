"""Adapters in PEFT's file format, and several named adapters on one quantized base.

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r × in)
                                 base_model.model.<module path>.lora_B.weight  (out × r)
                                 base_model.model.<module path>.lora_magnitude_vector  (out; DoRA only)
                                 mixture-of-experts projections (experts.py), PEFT's `target_parameters`:
                                 base_model.model.<experts>[.base_layer].lora_A.weight  (E·r × in)
                                 base_model.model.<experts>[.base_layer].lora_B.weight  (out × r·E)
                                 (PEFT nests one wrapper per targeted parameter: with both targeted,
                                 gate_up_proj's factors sit under .base_layer, down_proj's above)
    qlora_lite.json              the run settings that rebuild the base it trained on (settings.py)
    qlora_lite_base.safetensors  LoftQ/PiSSA only: the NF4 base of the adapted modules, which is not
                                 NF4(W0) (bitsandbytes' keys: <module>.weight, .weight.absmax, ...)

Files written here load with `peft.PeftModel.from_pretrained` (it reads the first two only), and
PEFT's load here. Switching adapters only changes which A/B pair each layer uses: the NF4 base is
never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import CheckpointError
from .dtensor import full_tensor
from .fsutil import atomic_directory
from .inject import lora_layers
from .experts import (PROJECTIONS, LoRAExpertProjection4bit, expert_delta_weight, peft_wrapper_path,
                      projection_from_wrapper)
from .layers import DEFAULT_ADAPTER, LoRALinear4bit, dora_merge, lora_scaling
from .nf4 import NF4Weight

if TYPE_CHECKING:  # (settings.py reads model directories: a level above this module)
    from .settings import RunSettings

__all__ = [
    "AdapterFile",
    "save_adapter",
    "model_card",
    "load_adapter",
    "read_adapter",
    "adapter_state_dict",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "list_adapters",
    "PEFT_PREFIX",
]

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_NAME = "qlora_lite_base.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?:(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight"
                  r"|(?P<magnitude>magnitude_vector))$")


@dataclass
class AdapterFile:
    """An adapter read from disk: its PEFT config and LoRA factors per module path."""

    config: dict
    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    path: Path
    magnitude: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # DoRA's m per module
    base_file: Path | None = None  # LoftQ/PiSSA: the NF4 base the adapter trained on (BASE_NAME)
    experts: dict[str, int] = dataclasses.field(default_factory=dict)  # "<experts>.<proj>" -> its expert count

    def stored_base(self, module: str) -> NF4Weight | None:
        """The NF4 base saved beside the adapter for `module` (LoftQ/PiSSA), else None: NF4(W0) applies."""
        if self.base_file is None:
            return None
        from safetensors import safe_open

        prefix = f"{module}.weight"
        with safe_open(str(self.base_file), framework="pt") as handle:
            keys = [k for k in handle.keys() if k == prefix or k.startswith(prefix + ".")]
            if not keys:
                return None
            try:
                return NF4Weight.from_state_dict({k: handle.get_tensor(k) for k in keys}, prefix, backend="torch")
            except ValueError as exc:
                raise CheckpointError(f"{self.base_file}: {exc}") from None

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        """The scaling of modules without a rank/alpha pattern; `scaling_for(module)` in general."""
        return lora_scaling(float(self.config.get("lora_alpha", self.r)), self.r, bool(self.config.get("use_rslora")))

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_A)

    def _pattern_value(self, field: str, module: str):
        # PEFT's rule (peft.utils.other.get_pattern_key): the first key matching the end of the path
        patterns = self.config.get(field) or {}
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        return None if key is None else patterns[key]

    def rank_for(self, module: str) -> int:
        value = self._pattern_value("rank_pattern", module)
        return self.r if value is None else int(value)

    def alpha_for(self, module: str) -> float:
        value = self._pattern_value("alpha_pattern", module)
        return float(self.config.get("lora_alpha", self.r) if value is None else value)

    def scaling_for(self, module: str) -> float:
        """α/r of this module (α/√r with rsLoRA), honouring PEFT's rank_pattern and alpha_pattern."""
        return lora_scaling(self.alpha_for(module), self.rank_for(module), bool(self.config.get("use_rslora")))

    def delta_weight(self, module: str) -> torch.Tensor:
        """s·B·A in fp32 for one module; for an expert projection (experts, out, in), one per expert."""
        if module in self.experts:
            return expert_delta_weight(self.lora_A[module], self.lora_B[module], self.experts[module],
                                       self.scaling_for(module))
        return self.scaling_for(module) * (self.lora_B[module].float() @ self.lora_A[module].float())

    def expert_delta_weight(self, module: str, expert: int) -> torch.Tensor:
        """s·B_e·A_e in fp32 for one expert of an expert projection (the rows and columns PEFT gives it)."""
        experts = self.experts[module]
        a, b = self.lora_A[module].float(), self.lora_B[module].float()
        r = a.shape[0] // experts
        return self.scaling_for(module) * (b[:, expert::experts] @ a[expert * r:(expert + 1) * r])

    def merged_weight(self, module: str, w0: torch.Tensor) -> torch.Tensor:
        """The module's weight with the adapter applied to `w0` (the base it trained on), in fp32:
        W0 + s·B·A, or for DoRA that rescaled to the magnitude row by row."""
        return dora_merge(w0, self.delta_weight(module), self.magnitude.get(module))


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter `name` (default: the active one) as PEFT-keyed tensors.

    Under FSDP the factors are sharded: every rank must call this (it all-gathers them).
    """
    out: dict[str, torch.Tensor] = {}
    layers = lora_layers(model)
    for path, layer in layers.items():
        key = name or layer.active_adapter
        if key in layer.adapters:
            if isinstance(layer, LoRAExpertProjection4bit):
                path = _expert_wrapper_path(layers, path, name)
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = full_tensor(layer.lora_A[key].detach()).contiguous()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = full_tensor(layer.lora_B[key].detach()).contiguous()
            if layer.adapters[key].use_dora:
                out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = full_tensor(
                    layer.lora_magnitude_vector[key].detach()).contiguous()
    if not out:
        raise CheckpointError(f"the model has no adapter named {name!r} to save; loaded: {list_adapters(model)}")
    return out


def _expert_wrapper_path(layers: dict, path: str, name: str | None) -> str:
    experts, _, projection = path.rpartition(".")
    adapted = [p for p in PROJECTIONS if (layer := layers.get(f"{experts}.{p}")) is not None
               and (name or layer.active_adapter) in layer.adapters]
    return peft_wrapper_path(experts, projection, adapted)


def _parameter_spec(layers: dict, adapted: list[str]) -> list[str]:
    """PEFT's `target_parameters` for the adapted expert projections: "experts.<proj>" when that selects
    exactly them (PEFT matches "."-suffixes), else their full paths."""
    experts = [p for p in layers if isinstance(layers[p], LoRAExpertProjection4bit)]
    short = sorted({".".join(p.rsplit(".", 2)[-2:]) for p in adapted})
    if sorted(p for p in experts if any(p.endswith("." + s) for s in short)) == sorted(adapted):
        return short
    return sorted(adapted)


def _target_spec(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """Short names when they select exactly the adapted modules (PEFT matches suffixes), else a regex."""
    short = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    all_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear4bit))]
    selected = [n for n in all_linear if n.rsplit(".", 1)[-1] in short]
    if sorted(selected) == sorted(adapted):
        return short
    return "^(" + "|".join(re.escape(p) for p in adapted) + ")$"


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None,
                 base_model_name_or_path: str | None = None, overwrite: bool = True,
                 tensors: dict[str, torch.Tensor] | None = None, settings: RunSettings | None = None) -> Path:
    """Write one adapter in PEFT's format, atomically (temp dir, fsync, rename).

    `tensors`: the `adapter_state_dict` already gathered (under FSDP every rank gathers, one writes).
    `settings`: the run settings that rebuild the model it trained on, written beside it (qlora_lite.json).
    """
    from safetensors.torch import save_file

    tensors = adapter_state_dict(model, name) if tensors is None else tensors
    layers = lora_layers(model)
    adapted = [p for p, l in layers.items() if (name or l.active_adapter) in l.adapters]
    specs = {p: layers[p].adapters[name or layers[p].active_adapter] for p in adapted}
    # the most common rank and alpha are the defaults; modules that differ go into PEFT's patterns
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.lora_alpha for s in specs.values()).most_common(1)[0][0]
    linear = [p for p in adapted if not isinstance(layers[p], LoRAExpertProjection4bit)]
    expert = [p for p in adapted if p not in linear]
    spec = specs[(linear or adapted)[0]]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: s.r for p, s in specs.items() if s.r != r},
        "alpha_pattern": {p: s.lora_alpha for p, s in specs.items() if s.lora_alpha != alpha},
        "lora_dropout": spec.lora_dropout,
        "target_modules": _target_spec(model, linear) if linear else [],
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": spec.use_dora,
    }
    if expert:
        config["target_parameters"] = _parameter_spec(layers, expert)
    if len({s.use_dora for s in specs.values()}) > 1:  # PEFT's config has one use_dora for all modules
        raise CheckpointError(f"adapter {name!r} mixes DoRA and plain LoRA modules; PEFT's format cannot say so")
    own_base = {}  # LoftQ/PiSSA: the base trained on is not NF4(W0); it travels with the adapter
    for path in adapted:
        if layers[path].own_base:
            own_base.update({k: full_tensor(v).contiguous()
                             for k, v in layers[path].weight.state_dict(prefix=f"{path}.weight.").items()})
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if own_base:
            save_file(own_base, str(tmp / BASE_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if settings is not None:
            settings.write(tmp)
        (tmp / "README.md").write_text(model_card(config), encoding="utf-8")
    return directory


def model_card(config: dict) -> str:
    """The README.md model card PEFT's save_pretrained writes (huggingface_hub's template with PEFT's
    metadata: library, base model, tags), plus the LoRA settings, so the Hub and PEFT tools read it alike."""
    from huggingface_hub import ModelCard, ModelCardData

    base = config.get("base_model_name_or_path")
    tags = sorted({"lora", "transformers", "qlora-lite", *([f"base_model:adapter:{base}"] if base else [])})
    card = ModelCard.from_template(ModelCardData(library_name="peft", base_model=base, tags=tags,
                                                 pipeline_tag="text-generation"))
    settings = ", ".join(f"{k}={config[k]}" for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"))
    return f"{card.content.rstrip()}\n\n## LoRA settings\n\n{settings} (written by qlora-lite)\n"


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read and validate a PEFT LoRA adapter directory (ours or PEFT's)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not weights_file.is_file():
        legacy = directory / "adapter_model.bin"
        hint = " (found adapter_model.bin: re-save it with safetensors)" if legacy.is_file() else ""
        raise CheckpointError(f"{weights_file} is missing{hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object; an adapter config maps names such as r, "
                              "lora_alpha and target_modules to values")
    bad = [f"{k}={config.get(k)!r}" for k in ("r", "lora_alpha") if k in config
           and (isinstance(config[k], bool) or not isinstance(config[k], (int, float)) or not config[k] > 0)]
    if bad:
        raise CheckpointError(f"{config_file}: {', '.join(bad)} must be positive numbers")
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise CheckpointError(f"{config_file} is not a LoRA adapter config (peft_type={config.get('peft_type')!r})")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:
        raise CheckpointError(f"{weights_file} is not a readable safetensors file ({exc})") from None
    lora_A, lora_B, magnitude = {}, {}, {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{weights_file}: unexpected tensor {key!r}; only LoRA A/B weights (and DoRA's "
                                  "lora_magnitude_vector) are supported")
        (magnitude if match["magnitude"] else lora_A if match["which"] == "A" else lora_B)[match["module"]] = value
    experts = _expert_modules(config, lora_A, lora_B, weights_file)
    if set(lora_A) != set(lora_B) or not lora_A:
        raise CheckpointError(f"{weights_file}: every module needs both lora_A and lora_B "
                              f"(A only: {sorted(set(lora_A) - set(lora_B))[:3]}, B only: {sorted(set(lora_B) - set(lora_A))[:3]})")
    for module in lora_A:
        a, b = lora_A[module], lora_B[module]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{weights_file}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; shapes do not chain")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # a diverged run: refuse before any use
            raise CheckpointError(f"{weights_file}: {module}'s lora_A/lora_B contain NaN or inf (a diverged training "
                                  "run?); use an earlier checkpoint's adapter")
    if bool(config.get("use_dora")) != bool(magnitude) or (magnitude and set(magnitude) != set(lora_A)):
        raise CheckpointError(f"{weights_file}: adapter_config.json says use_dora={bool(config.get('use_dora'))} but "
                              f"{len(magnitude)} of {len(lora_A)} modules carry a lora_magnitude_vector; DoRA needs one "
                              "per module, plain LoRA none")
    for module, m in magnitude.items():
        if m.shape != (lora_B[module].shape[0],) or not torch.isfinite(m).all():
            raise CheckpointError(f"{weights_file}: {module}'s lora_magnitude_vector has shape {tuple(m.shape)} (or "
                                  f"non-finite values); DoRA needs {lora_B[module].shape[0]} finite values")
    base_file = directory / BASE_NAME
    adapter = AdapterFile(config, lora_A, lora_B, directory, magnitude, base_file if base_file.is_file() else None,
                          experts)
    for module in lora_A:
        if lora_A[module].shape[0] != adapter.rank_for(module) * experts.get(module, 1):
            raise CheckpointError(f"{weights_file}: {module} has rank {lora_A[module].shape[0]} but adapter_config.json "
                                  f"says r={adapter.rank_for(module)} for it (r, rank_pattern)")
    return adapter


def _expert_modules(config: dict, lora_A: dict, lora_B: dict, weights_file: Path) -> dict[str, int]:
    """Rename PEFT's parameter-target entries ("<experts>[.base_layer]") to "<experts>.<proj>" in place,
    and return each one's expert count (A is (E·r, in): E = rows / r)."""
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{weights_file.parent / CONFIG_NAME}: target_parameters={targets!r} must be a list of "
                              "parameter names")
    found: dict[str, int] = {}
    for path in [p for p in lora_A if targets]:
        base = path
        while base.endswith(".base_layer"):
            base = base.removesuffix(".base_layer")
        adapted = [p for p in PROJECTIONS if any(f"{base}.{p}" == t or f"{base}.{p}".endswith("." + t)
                                                 for t in targets)]
        if not adapted:
            continue  # a linear (target_modules)
        try:
            experts, projection = projection_from_wrapper(path, adapted)
        except ValueError as exc:
            raise CheckpointError(f"{weights_file}: {exc}") from None
        module = f"{experts}.{projection}"
        lora_A[module], lora_B[module] = lora_A.pop(path), lora_B.pop(path, None)
        if lora_B[module] is None:
            raise CheckpointError(f"{weights_file}: {path} has lora_A but no lora_B")
        r = _pattern_rank(config, module)
        if lora_A[module].shape[0] % r:
            raise CheckpointError(f"{weights_file}: {path}'s lora_A has {lora_A[module].shape[0]} rows, not a "
                                  f"multiple of r={r} (one block of r rows per expert)")
        found[module] = lora_A[module].shape[0] // r
    return found


def _pattern_rank(config: dict, module: str) -> int:
    return AdapterFile(config, {}, {}, Path()).rank_for(module)


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT_ADAPTER,
                 activate: bool = True) -> AdapterFile:
    """Attach the adapter in `directory` as `name`; everything is checked before anything changes."""
    adapter = read_adapter(directory)
    layers = lora_layers(model)
    missing = [m for m in adapter.modules if m not in layers]
    if missing:
        field = "target_parameters" if missing[0] in adapter.experts else "target_modules"
        raise CheckpointError(f"{adapter.path}: adapter targets modules this model has no LoRA layer for, e.g. "
                              f"{missing[:3]}; use the base model it was trained on (a model built with "
                              f"load_model(lora=...) needs {field} "
                              f"covering {sorted({m.rsplit('.', 1)[-1] for m in missing})})")
    for module in adapter.modules:
        layer = layers[module]
        a, b = adapter.lora_A[module], adapter.lora_B[module]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise CheckpointError(f"{adapter.path}: {module} expects in={a.shape[1]}, out={b.shape[0]} but the model's "
                                  f"layer is in={layer.in_features}, out={layer.out_features}: wrong base model")
        experts = getattr(layer, "num_experts", None)
        if adapter.experts.get(module) != experts:
            raise CheckpointError(f"{adapter.path}: {module} is adapted for {adapter.experts.get(module, 'no')} experts "
                                  f"but the model's layer has {experts or 'none (a linear)'}: wrong base model")
    own_bases = {m: adapter.stored_base(m) for m in adapter.modules}  # all read (and checked) before any change
    for module, base in own_bases.items():
        if base is not None and (not layers[module].quantized or base.shape != layers[module].weight.shape):
            raise CheckpointError(f"{adapter.base_file}: {module}'s stored NF4 base {list(base.shape)} does not fit "
                                  f"the model's layer ({layers[module].extra_repr()}); load it onto an NF4 model "
                                  "of the base it was trained on")
    for module in adapter.modules:
        layer = layers[module]
        a, b = adapter.lora_A[module], adapter.lora_B[module]
        if own_bases[module] is not None:  # the LoftQ/PiSSA base replaces NF4(W0) under every adapter of the layer
            layer.weight.load_state_dict(own_bases[module].state_dict(prefix="weight."))
            layer.own_base = True
        dtype = next(iter(layer.lora_A.values())).dtype if len(layer.lora_A) else torch.float32
        dropout = 0.0 if module in adapter.experts else float(adapter.config.get("lora_dropout", 0.0))  # PEFT's rule
        layer.add_adapter(name, adapter.rank_for(module), adapter.alpha_for(module), dropout,
                          bool(adapter.config.get("use_rslora", False)),
                          dtype=dtype, activate=False, use_dora=adapter.use_dora)
        params = [(layer.lora_A[name], a), (layer.lora_B[name], b)]
        if adapter.use_dora:
            params.append((layer.lora_magnitude_vector[name], adapter.magnitude[module]))
        with torch.no_grad():
            for param, value in params:
                param.copy_(value)
                param.requires_grad_(False)
    if activate:
        set_adapter(model, name)
    return adapter


def list_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` active everywhere (layers it does not cover compute the base alone)."""
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; loaded: {list_adapters(model)}")
    for layer in lora_layers(model).values():
        layer.active_adapter = name if name in layer.adapters else None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Pure base behaviour inside the block."""
    with contextlib.ExitStack() as stack:
        for layer in lora_layers(model).values():
            stack.enter_context(layer.disable_adapter())
        yield


def delete_adapter(model: nn.Module, name: str) -> None:
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; loaded: {list_adapters(model)}")
    for layer in lora_layers(model).values():
        if name in layer.adapters:
            layer.delete_adapter(name)
