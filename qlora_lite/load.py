"""Streaming load of a Hugging Face causal LM into a quantized model with LoRA adapters.

    config.json ──► model skeleton on the meta device (no memory)
    *.safetensors ──► one tensor at a time (plain reads, shards.py; nothing stays mapped):
         target linear weight ──► NF4Weight.from_tensor on the target device ──► LoRALinear4bit
         bnb-4bit quant-state keys ──► NF4Weight.from_state_dict (no re-quantization)
         per-expert weights (Mixtral w1/w3/w2, Qwen-MoE gate/up/down_proj) ──► each expert's matrix
                                       ──► NF4Weight per expert ──► LoRAExperts4bit (experts.py)
         everything else ──► compute dtype, placed into the skeleton
    tokenizer files ──► AutoTokenizer

The full 16-bit model never exists in memory: host peak ≈ the largest tensor + the quantized model.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from collections import defaultdict
from typing import Any
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig, QuantConfig, resolve_dtype
from .errors import CheckpointError, ConfigError
from .experts import ExpertAssembler, expert_source, fused_experts_modules, model_key
from .inject import (check_experts, find_expert_targets, find_targets, freeze_base, make_experts_layer,
                     make_lora_layer, quantize_expert, quantize_target, replace_module)
from .nf4 import NF4Weight, resolve_backend
from .shards import ShardReader, TensorEntry, read_header

__all__ = ["load_model", "load_skeleton", "is_prequantized", "load_tokenizer", "checkpoint_files", "resolve_device",
           "read_safetensors_keys", "release_free_memory", "tensor_catalog", "check_finite", "tied_head",
           "check_tied_head", "build_skeleton", "meta_model", "check_bnb_nf4"]

logger = logging.getLogger(__name__)
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={str(device)!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'",
                          "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device='cuda' requested but CUDA is not available; use device='cpu' or 'auto'")
    return device


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors shards of a model directory, validated; errors say which file and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory; pass a Hugging Face model directory "
                              "(config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}/config.json is missing; a Hugging Face model directory needs it "
                              "(save with model.save_pretrained(dir))")
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json is not valid JSON ({exc}); fix or re-save it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}/config.json is not a JSON object; fix or re-save it")
    weight_map = _weight_map(path)
    if weight_map is not None:
        index = path / "model.safetensors.index.json"
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing in {path}: {missing}; "
                                  "copy the complete checkpoint")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    if list(path.glob("*.bin")):
        raise CheckpointError(f"{path} holds only PyTorch .bin weights; convert them to safetensors "
                              "(load with transformers and save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def _weight_map(path: Path) -> dict[str, str] | None:
    """The index's {tensor: shard file name}, or None for a checkpoint without an index."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("names must be strings")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-save the model") from None
    return weight_map


def tensor_catalog(path: str | Path) -> dict[str, tuple[Path, TensorEntry]]:
    """{tensor name: (its shard, its header entry)} of a model directory, from the headers alone.

    A tensor stored in two shards, or an index whose weight_map disagrees with what the shards hold, is
    refused: which copy a loader would take is then a matter of file order (loading used the stale one).
    """
    path = Path(path)
    files = checkpoint_files(path)
    catalog: dict[str, tuple[Path, TensorEntry]] = {}
    for file in files:
        for key, entry in read_header(file).items():
            if key in catalog:
                raise CheckpointError(f"{key} is stored twice ({catalog[key][0].name} and {file.name}); the "
                                      "checkpoint is inconsistent: re-save it with transformers")
            catalog[key] = (file, entry)
    weight_map = _weight_map(path)
    if weight_map is not None:
        index = path / "model.safetensors.index.json"
        for key in sorted(set(weight_map) | set(catalog)):
            stored = catalog[key][0].name if key in catalog else None
            if weight_map.get(key) != stored:
                where = f"in {stored}" if stored else "in no shard"
                raise CheckpointError(f"{index.name} says {key} is in {weight_map.get(key)}, but it is {where}; the "
                                      "index and the shards disagree: re-save or re-download the checkpoint")
    return catalog


def check_finite(tensor: torch.Tensor, name: str, where: str | Path) -> None:
    """CheckpointError naming the tensor if it holds NaN or inf (one aminmax pass: NaN/inf propagate)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.element_size() == 1:  # float8: no aminmax kernel on CPU
        tensor = tensor.to(torch.float16)
    low, high = torch.aminmax(tensor.reshape(-1))
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise CheckpointError(f"{where}: tensor {name} contains NaN or inf; the checkpoint is corrupt or was saved "
                              "from a diverged run: re-download or re-save it")


def tied_head(model: nn.Module) -> tuple[str, str] | None:
    """(output-embedding weight key, input-embedding weight key) when config ties them, else None."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return f"{names[id(head)]}.weight", f"{names[id(embed)]}.weight"


def check_tied_head(path: str | Path, catalog: dict[str, tuple[Path, TensorEntry]], tied: tuple[str, str] | None
                    ) -> None:
    """Refuse tie_word_embeddings=true beside a stored head that differs from the embeddings.

    Tying would silently replace the stored head (transformers warns and keeps one of them); which one
    the user meant cannot be guessed, so loading and merging refuse alike. An identical copy is fine.
    """
    if tied is None or tied[0] not in catalog or tied[1] not in catalog:
        return
    tensors = []
    for key in tied:
        with ShardReader(catalog[key][0]) as reader:
            tensors.append(reader.get(key))
    if tensors[0].shape != tensors[1].shape or not torch.equal(tensors[0], tensors[1]):
        raise CheckpointError(f"{path}/config.json sets tie_word_embeddings=true but the checkpoint stores a "
                              f"{tied[0]} that differs from {tied[1]}; set tie_word_embeddings to false in config.json "
                              f"to use the stored head, or delete {tied[0]} from the checkpoint to tie them")


def read_safetensors_keys(file: Path) -> list[str]:
    """Tensor names of one shard; a truncated or corrupt file is a clear error."""
    return list(read_header(file))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"no usable tokenizer in {path} ({type(exc).__name__}: {exc}); copy the "
                              "tokenizer files (tokenizer.json, tokenizer_config.json) next to config.json") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_bnb_nf4(quantization_config: Any, where: str | Path) -> dict | None:
    """A checkpoint's `quantization_config` as a dict when it is bitsandbytes 4-bit NF4, None when there is none;
    CheckpointError (one line, naming `where`) for any other quantization."""
    if not quantization_config:
        return None
    qc = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise CheckpointError(f"{where} is quantized with {qc.get('quant_method')!r}; only bitsandbytes 4-bit NF4 "
                              "checkpoints (or unquantized ones) can be used")
    if qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise CheckpointError(f"{where} uses bnb_4bit_quant_type={qc.get('bnb_4bit_quant_type')!r}; only nf4 is "
                              "supported")
    return qc


def meta_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """`config`'s causal LM on the meta device (no weights allocated); ValueError when transformers has no
    causal-LM class for it. Heads are not tied (tie_weights() does what a real instantiation would)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def build_skeleton(path: str | Path, compute_dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict | None]:
    """`path`'s model on the meta device: `(model, transformers config, bitsandbytes quantization_config or
    None)`; CheckpointError (one line) when config.json is unreadable, quantized otherwise than NF4, or not a
    causal LM."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the fix is the user's config.json
        raise CheckpointError(f"{path}/config.json cannot be read by transformers ({exc})".splitlines()[0]) from None
    prequant = check_bnb_nf4(getattr(config, "quantization_config", None), path)
    if prequant is not None:
        del config.quantization_config
    if compute_dtype is not None:
        config.dtype = compute_dtype
    try:
        model = meta_model(config, compute_dtype)
    except ValueError as exc:
        raise CheckpointError(f"{path}: transformers cannot build a causal LM from config.json ({exc})"
                              .splitlines()[0]) from None
    return model, config, prequant


def load_model(path: str | Path, quant: QuantConfig | None = None, lora: LoraConfig | None = None,
               device: str | torch.device = "auto", compute_dtype: str | torch.dtype = "auto",
               with_tokenizer: bool = True, progress: bool = False, storage_device: str | torch.device | None = None):
    """Load `path` with every linear but the head in NF4 and LoRA adapters on `lora`'s targets.

    `quant=None` keeps linears in the compute dtype (plain LoRA, the same code path).
    `lora=None` loads the quantized base without adapters. Returns `(model, tokenizer)`.
    `storage_device`: where the loaded model is kept, when not `device` (quantize on the GPU, keep
    the bytes in host memory until FSDP moves each rank's shard onto its GPU).
    """
    path = Path(path)
    quant = QuantConfig() if quant is None and lora is None else quant
    device = resolve_device(device)
    storage = device if storage_device is None else torch.device(storage_device)
    compute_dtype = resolve_dtype(quant.compute_dtype if quant and compute_dtype == "auto" else compute_dtype, device)
    files = checkpoint_files(path)
    catalog = tensor_catalog(path)
    model, config, prequant = build_skeleton(path, compute_dtype)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    tied = tied_head(model)
    check_tied_head(path, catalog, tied)

    linear_names = find_targets(model, "all-linear")
    lora_targets = set(find_targets(model, lora.target_modules)) if lora is not None else set()
    if tied is not None and tied[0].removesuffix(".weight") in lora_targets:
        raise ConfigError(f"target_modules selects {tied[0].removesuffix('.weight')}, which is tied to the input "
                          "embeddings (tie_word_embeddings); LoRA on it is not supported: leave it out of "
                          "target_modules", "lora")
    if quant is None and prequant is not None:
        raise CheckpointError(f"{path} is a 4-bit checkpoint; it cannot be loaded as 16-bit (quant=None)")
    quantized = set(linear_names) if (quant is not None or prequant) else set()
    kept_dense = lora_targets - quantized
    experts_modules = fused_experts_modules(model)
    expert_targets = find_expert_targets(model, lora) if lora is not None else []
    check_experts(model, lora, expert_targets)
    if experts_modules and prequant is not None:
        raise CheckpointError(f"{path} is a 4-bit mixture-of-experts checkpoint; bitsandbytes defines no 4-bit "
                              "layout for fused experts: load the 16-bit checkpoint (experts are quantized at load)")
    assembler = ExpertAssembler()
    expert_bases: dict[tuple[str, str], dict[int, NF4Weight | torch.Tensor]] = defaultdict(dict)
    expected = dict(model.state_dict(keep_vars=True))
    bases: dict[str, NF4Weight | torch.Tensor] = {}
    pending_quant: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    seen: set[str] = set()
    unexpected: list[str] = []

    shard_iter = files
    if progress:
        from tqdm.auto import tqdm

        shard_iter = tqdm(files, desc="loading shards", unit="shard")
    for file in shard_iter:
        with ShardReader(file) as handle:
            for key in handle.keys():
                source = expert_source(key)
                if source is not None and source.experts in experts_modules:
                    tensor = handle.get(key)
                    check_finite(tensor, key, file)
                    for experts, proj, e, matrix in assembler.add(source, tensor):
                        expert_bases[experts, proj][e] = _expert_base(
                            experts_modules[experts], proj, e, matrix, quant, device, storage, compute_dtype, file)
                    seen.add(key)
                    del tensor
                    continue
                if key not in expected and model_key(key) in expected:  # Mixtral's router
                    key, stored_key = model_key(key), key
                else:
                    stored_key = key
                module_name, _, leaf = key.rpartition(".")
                owner = _quant_owner(key)
                if owner is not None and owner in quantized:
                    tensor = handle.get(key)
                    check_finite(tensor, key, file)
                    pending_quant[owner][key] = tensor.to(storage)
                    seen.add(f"{owner}.weight")
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                tensor = handle.get(stored_key)
                check_finite(tensor, key, file)  # norms and embeddings too, not only what NF4 quantizes
                if leaf == "weight" and module_name in quantized and tensor.dtype == torch.uint8:
                    pending_quant[module_name][key] = tensor.to(storage)
                    seen.add(key)
                    continue
                target_shape = expected[key].shape
                if tensor.shape != target_shape:
                    raise CheckpointError(f"{file.name}: tensor {key} has shape {list(tensor.shape)} but config.json "
                                          f"implies {list(target_shape)}; the weights do not belong to this config")
                seen.add(key)
                if leaf == "weight" and module_name in quantized:
                    base = quantize_target(tensor.to(device), quant, lora if module_name in lora_targets else None,
                                           key)  # NF4(W0), or LoftQ/PiSSA's base and factors
                    if isinstance(base, NF4Weight):
                        base = base.to(storage)
                    else:
                        base.base = base.base.to(storage)
                    bases[module_name] = base
                elif leaf == "weight" and module_name in kept_dense:
                    bases[module_name] = tensor.to(device=storage, dtype=compute_dtype)
                else:
                    _set_tensor(model, key, tensor.to(device=storage, dtype=_target_dtype(tensor, compute_dtype)))
                del tensor
                release_free_memory()
        release_free_memory()
        for owner in [o for o, t in pending_quant.items() if f"{o}.weight.quant_state.bitsandbytes__nf4" in t]:
            try:
                bases[owner] = NF4Weight.from_state_dict(pending_quant.pop(owner), f"{owner}.weight",
                                                         backend=quant.backend if quant else "auto")
            except ValueError as exc:
                raise CheckpointError(f"{file.name}: {exc}") from None

    if pending_quant:
        raise CheckpointError(f"{path}: 4-bit weights without a complete quant state: {sorted(pending_quant)[:5]}")
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])

    for name, experts in experts_modules.items():
        adapted = {t.rpartition(".")[2] for t in expert_targets if t.rpartition(".")[0] == name}
        per_proj = {p: expert_bases.pop((name, p), {}) for p in ("gate_up_proj", "down_proj")}
        count = getattr(experts, "gate_up_proj").shape[0]
        lacking = [f"{name}.{p}[{e}]" for p, got in per_proj.items() for e in range(count) if e not in got]
        if lacking:
            raise CheckpointError(f"{path}: the checkpoint lacks {len(lacking)} expert weights, e.g. {lacking[:3]} "
                                  "(an incomplete download, or a gate without its up half?)")
        layer_bases = {p: [got[e] for e in range(count)] if quant is not None else torch.stack([got[e] for e in
                       range(count)]) for p, got in per_proj.items()}
        replace_module(model, name, make_experts_layer(layer_bases, experts.act_fn, lora if adapted else None,
                                                       adapted, compute_dtype))

    for name in sorted(quantized | kept_dense):
        if name not in bases:
            continue
        linear = model.get_submodule(name)
        bias = linear.bias if linear.bias is not None and linear.bias.device.type != "meta" else None
        layer = make_lora_layer(bases.pop(name), None if bias is None else bias.detach(),
                                lora if name in lora_targets else None, compute_dtype=compute_dtype, device=device)
        replace_module(model, name, layer)

    model.tie_weights()
    missing = _still_on_meta(model)
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensors the config needs, e.g. "
                              f"{missing[:5]}; the files are incomplete or belong to another model")
    model.to(storage)
    return _finish(model), tokenizer


def _expert_base(experts: nn.Module, proj: str, e: int, matrix: torch.Tensor, quant: QuantConfig | None,
                 device: torch.device, storage: torch.device, compute_dtype: torch.dtype,
                 file: Path) -> NF4Weight | torch.Tensor:
    """One expert's matrix as the loader keeps it: NF4 (quantized on `device`), or 16-bit for quant=None."""
    want = tuple(getattr(experts, proj).shape[1:])
    if tuple(matrix.shape) != want:
        raise CheckpointError(f"{file.name}: expert {e}'s {proj} is {list(matrix.shape)} but config.json implies "
                              f"{list(want)}; the weights do not belong to this config")
    if quant is None:
        return matrix.to(device=storage, dtype=compute_dtype)
    return quantize_expert(matrix.to(device), quant, f"{proj}[{e}]").to(storage)


def is_prequantized(path: str | Path) -> bool:
    """Whether `path`'s config.json declares a quantized checkpoint (bitsandbytes 4-bit)."""
    try:
        return "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False  # load_model explains what is wrong with the directory


def load_skeleton(path: str | Path, quant: QuantConfig, lora: LoraConfig | None, device: str | torch.device,
                  compute_dtype: str | torch.dtype = "auto"):
    """What `load_model(path, quant, lora, device)` returns, on the meta device, reading no weights.

    Same modules, parameter names and shapes (NF4 storage included; `NF4Weight.empty`), so a
    process that receives its weights from another one (`fsdp.load_sharded`) can start from it.
    Real non-persistent buffers (rotary frequencies), as the skeleton computes them at init.
    For a 16-bit checkpoint quantized at load only. Returns `(model, tokenizer)`.
    """
    path, device = Path(path), resolve_device(device)
    if is_prequantized(path):
        raise CheckpointError(f"{path} is a 4-bit checkpoint; load_skeleton builds the quantize-at-load model only")
    compute_dtype = resolve_dtype(quant.compute_dtype if compute_dtype == "auto" else compute_dtype, device)
    stored = {name: entry.dtype for name, (_file, entry) in tensor_catalog(path).items()}
    tokenizer = load_tokenizer(path)
    model, _, _ = build_skeleton(path, compute_dtype)
    if fused_experts_modules(model):
        raise CheckpointError(f"{path} is a mixture-of-experts model; the meta skeleton (FSDP's sharded load) does "
                              "not build NF4 experts yet: train it on one GPU (load_model)")
    lora_targets = set(find_targets(model, lora.target_modules)) if lora is not None else set()
    backend = resolve_backend(quant.backend, device)
    for name in find_targets(model, "all-linear"):
        linear = model.get_submodule(name)
        base = NF4Weight.empty(linear.weight.shape, stored.get(f"{name}.weight", compute_dtype), quant.blocksize,
                               quant.double_quant, backend)
        bias = None if linear.bias is None else linear.bias.detach()
        replace_module(model, name, make_lora_layer(base, bias, lora if name in lora_targets else None,
                                                    compute_dtype=compute_dtype, device=device))
    return _finish(model), tokenizer


def _finish(model: nn.Module) -> nn.Module:
    model.tie_weights()  # (again, after the layer swaps, for the skeleton)
    freeze_base(model)
    model.eval()
    model.config.use_cache = False
    return model


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after large frees, so a streaming
    load would otherwise show the whole checkpoint in RSS even though it never held it)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _quant_owner(key: str) -> str | None:
    """'x.weight.absmax' -> 'x' for the bitsandbytes quant-state keys."""
    for suffix in _QUANT_SUFFIXES:
        if key.endswith(".weight" + suffix):
            return key[: -len(".weight" + suffix)]
    return None


def _target_dtype(tensor: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if tensor.is_floating_point() else tensor.dtype


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, leaf)
    if isinstance(old, nn.Parameter):
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    else:
        module.register_buffer(leaf, value, persistent=leaf not in module._non_persistent_buffers_set)


def _still_on_meta(model: nn.Module) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    names += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    return names
