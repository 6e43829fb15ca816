"""Streaming merge of a LoRA adapter into its base checkpoint, exported as a normal HF checkpoint.

    base_dir/ (config.json + *.safetensors, or bnb-4bit)     adapter_dir/ (PEFT format)
        │ shard headers only: names, shapes, dtypes               │ read_adapter: A, B, s
        ▼                                                         ▼
    plan + validate everything: adapter modules exist as 2-D weights with matching in/out,
    every shard readable, the output plan (shard names, offsets) complete   ── nothing written yet
        │
        ▼
    for each input shard (safe_open, one tensor at a time):
        target W0 ──► NF4 quantize ──► dequantize fp32 ──┐   (base="original": W0 in fp32)
        bnb-4bit W ──► NF4Weight.from_state_dict ──► fp32 ┤
                                                         + s·B·A (fp32) ──► finite check ──► cast ──► range check
        other tensor ──────────────────────────────────────────────────────► cast (floats) ──► range check
        │        written at its precomputed offset into the output shard; a shard is closed once full
        ▼
    temp dir: model-0000k-of-0000n.safetensors + index.json + config.json (new dtype, no
    quantization_config) + tokenizer files ──► [verify_merge] ──► fsync ──► rename to out_dir

W is what training computed with: dequantize(quantize(W0)) + s·B·A, rounded once to the output
dtype. Host memory stays near one input shard plus the adapter: output bytes go straight to disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .adapter import AdapterFile, load_adapter, read_adapter
from .config import QuantConfig
from .errors import CheckpointError, ConfigError, QLoraLiteError
from .fsutil import DiskFullError, OutputExistsError, atomic_directory
from .inject import find_targets, lora_layers, replace_module
from .layers import DenseWeight, LoRALinear4bit
from .load import checkpoint_files, load_model, load_tokenizer, read_safetensors_keys
from .nf4 import NF4Weight

__all__ = [
    "merge", "verify_merge", "merge_weight", "merge_adapter", "unmerge_adapter", "parse_size",
    "MergeReport", "MergeError", "MergeOverflowError", "VerificationError", "DEFAULT_PROMPTS",
]

BaseKind = Literal["quantized", "original"]
_OUT_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
_SIDE_FILES = ("tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "*.model", "chat_template*",
               "generation_config.json", "vocab.json", "vocab.txt", "merges.txt")
DEFAULT_PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, "
    "so water boils at a lower temperature and food takes longer to cook.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is",
)
# Default max |Δlogit| by the merged checkpoint's dtype: the merged weights carry one rounding to it.
_DEFAULT_MAX_DIFF = {torch.float32: 1e-2, torch.float16: 0.5, torch.bfloat16: 2.0}


class MergeError(QLoraLiteError, RuntimeError):
    """The merge cannot produce a correct checkpoint (non-finite values, refused in-memory merge)."""


class MergeOverflowError(MergeError, OverflowError):
    """A merged value does not fit the output dtype (float16 tops out at ±65504)."""


class VerificationError(MergeError):
    """The merged checkpoint's logits disagree with the base + adapter model beyond the thresholds."""


@dataclass
class MergeReport:
    out_dir: Path
    merged_modules: int
    copied_tensors: int  # cast only
    dequantized_tensors: int  # non-target linears written as training saw them: dequantize(NF4 W0)
    bytes_written: int
    seconds: float
    gb_per_s: float  # tensor bytes written per second, whole merge (read, quantize, add, cast, write)
    peak_rss_bytes: int
    shards: int = 1
    dtype: str = "float16"
    base: str = "quantized"
    bytes_read: int = 0
    verification: dict[str, Any] | None = None

    def summary(self) -> str:
        text = (f"merged {self.merged_modules} modules, wrote {self.dequantized_tensors} NF4-dequantized linears and "
                f"{self.copied_tensors} copied tensors into {self.shards} "
                f"{self.dtype} shard(s) at {self.out_dir}: {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.gb_per_s:.3f} GB/s), peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")
        if self.verification:
            v = self.verification
            text += f"; verified: max |Δlogit| {v['max_abs_logit_diff']:.3g}, top-1 agreement {v['top1_agreement']:.4f}"
        return text


@dataclass
class _Item:
    """One output tensor: where it comes from, what happens to it, where it goes."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    merge: bool  # + s·B·A
    quantized: bool  # training held it in NF4: written as dequantize(quantize(W0)) (base="quantized")
    nf4: bool  # stored as bnb-4bit in the base checkpoint
    shard: int = 0
    offset: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class _Plan:
    files: list[Path]
    items: list[_Item]
    shard_names: list[str]
    headers: list[bytes]
    adapter: AdapterFile
    config: dict[str, Any]
    quant_files: dict[str, Path] = field(default_factory=dict)  # bnb quant-state key -> its shard

    @property
    def total_bytes(self) -> int:
        return sum(it.nbytes for it in self.items)


def parse_size(size: int | str) -> int:
    """'2GB' -> 2_000_000_000, '1GiB' -> 2**30, 500_000 -> 500_000 (as transformers reads max_shard_size)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ConfigError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '500MB', '2GB', '1GiB'")
    unit = match[2] or "B"
    factor = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** (" KMGT".index(unit[0]))
    value = int(float(match[1]) * factor)
    if value <= 0:
        raise ConfigError(f"max_shard_size={size!r} must be positive")
    return value


def merge_weight(w0: torch.Tensor, delta: torch.Tensor, base: BaseKind = "quantized",
                 quant: QuantConfig = QuantConfig(), name: str = "weight") -> torch.Tensor:
    """fp32 dequantize(quantize(W0)) + s·B·A (what training saw); base="original": W0 + s·B·A."""
    if base == "quantized":
        w = NF4Weight.from_tensor(w0, quant.blocksize, quant.double_quant, backend="torch",
                                  name=name).dequantize(torch.float32)
    else:
        w = w0.to(torch.float32, copy=True)
    return w.add_(delta.to(w.device, torch.float32))


def _cast_checked(name: str, w: torch.Tensor, dtype: torch.dtype, merged: bool) -> torch.Tensor:
    if not w.is_floating_point():
        return w
    out = w.to(dtype)
    if bool(torch.isfinite(out).all()):
        return out
    if bool(torch.isfinite(w).all()):
        peak = w.abs().max().item()
        raise MergeOverflowError(f"{name}: values reach {peak:.6g}, beyond {str(dtype).removeprefix('torch.')}'s "
                                 f"range (float16 max 65504); merge with dtype='bfloat16' (float32's range) "
                                 "or dtype='float32'")
    if merged:
        raise MergeError(f"{name}: the merged weight contains NaN or inf (the adapter or the base weight is "
                         "not finite); check the adapter file, e.g. a diverged training run")
    return out  # a copied tensor that was already non-finite in the base is copied as it is


# ---- planning: everything is read and checked before anything is written ------------------------

def _scan(files: list[Path], base_dir: Path) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    from safetensors import safe_open

    catalog: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for file in files:
        read_safetensors_keys(file)  # a corrupt or truncated header is a CheckpointError naming the file
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                dtype = _ST_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key} has dtype {view.get_dtype()}, which merge cannot "
                                          "convert; re-save the checkpoint in float16/bfloat16/float32")
                if key in catalog:
                    raise CheckpointError(f"{key} is stored twice ({catalog[key][0].name} and {file.name}); "
                                          "the checkpoint is inconsistent: re-save it")
                catalog[key] = (file, tuple(view.get_shape()), dtype)
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        for key, name in json.loads(index.read_text())["weight_map"].items():
            if key not in catalog or catalog[key][0].name != name:
                raise CheckpointError(f"{index} says {key} is in {name}, but that shard does not hold it; "
                                      "the index and the shards disagree: re-save or re-download the checkpoint")
    return catalog


def _quant_owner(key: str) -> str | None:
    for suffix in _QUANT_SUFFIXES:
        if key.endswith(".weight" + suffix):
            return key[: -len(suffix)]
    return None


def _prequant_shapes(config: dict, catalog: dict, base_dir: Path) -> tuple[dict[str, tuple[int, int]], dict[str, Path]]:
    """For a bnb-4bit checkpoint: logical shape of each packed weight, and the shard of every quant-state key."""
    qc = config.get("quantization_config")
    if not qc:
        return {}, {}
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") \
            or qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise CheckpointError(f"{base_dir}/config.json: quantization_config {qc.get('quant_method')!r} is not "
                              "bitsandbytes 4-bit NF4; only NF4 (or unquantized) checkpoints can be merged")
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    quant_files = {k: catalog[k][0] for k in catalog if _quant_owner(k)}
    for key, (file, _shape, dtype) in catalog.items():
        if dtype != torch.uint8 or not key.endswith(".weight"):
            continue
        meta_key = f"{key}.quant_state.bitsandbytes__nf4"
        if meta_key not in catalog or f"{key}.absmax" not in catalog:
            kind = "FP4" if f"{key}.quant_state.bitsandbytes__fp4" in catalog else "incomplete"
            raise CheckpointError(f"{file}: {key} is a 4-bit weight with an {kind} quant state; only complete NF4 "
                                  "bitsandbytes checkpoints can be merged")
        with safe_open(str(catalog[meta_key][0]), framework="pt") as handle:
            meta = json.loads(bytes(handle.get_tensor(meta_key).numpy()).decode("utf-8"))
        shapes[key] = tuple(meta["shape"])
    return shapes, quant_files


def _validate_adapter(adapter: AdapterFile, catalog: dict, nf4_shapes: dict, config: dict) -> None:
    if adapter.config.get("fan_in_fan_out"):
        raise CheckpointError(f"{adapter.path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported by merge")
    problems = []
    for module in adapter.modules:
        key = f"{module}.weight"
        a, b = adapter.lora_A[module], adapter.lora_B[module]
        if key not in catalog:
            tied = " (lm_head is tied to the input embeddings here)" if module.endswith("lm_head") \
                and config.get("tie_word_embeddings") else ""
            problems.append(f"{module}: no weight {key} in the base checkpoint{tied}")
            continue
        shape = nf4_shapes.get(key, catalog[key][1])
        if len(shape) != 2:
            problems.append(f"{module}: base weight has shape {list(shape)}, not a 2-D linear weight")
        elif (b.shape[0], a.shape[1]) != tuple(shape):
            problems.append(f"{module}: adapter is out={b.shape[0]} x in={a.shape[1]}, base weight is {list(shape)}")
        elif not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            problems.append(f"{module}: lora_A/lora_B contain NaN or inf")
    if problems:
        raise CheckpointError(f"{adapter.path} does not fit the base checkpoint ({len(problems)} problems, e.g. "
                              + "; ".join(problems[:5]) + "); merge it into the base model it was trained on")


def _linear_modules(base_dir: Path) -> set[str]:
    """The linears load_model stores in NF4 (every nn.Linear but the LM head), from a meta-device skeleton."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{base_dir}/config.json: transformers cannot build a causal LM from it ({exc})") from None
    return set(find_targets(skeleton, "all-linear"))


def _safetensors_header(items: list[_Item]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for it in items:
        header[it.name] = {"dtype": _ST_NAMES[it.dtype], "shape": list(it.shape),
                           "data_offsets": [it.offset, it.offset + it.nbytes]}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    return len(blob).to_bytes(8, "little") + blob


def _plan(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, base: BaseKind, max_bytes: int) -> _Plan:
    files = checkpoint_files(base_dir)  # missing shards / index problems: CheckpointError naming the file
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{base_dir}/config.json is not valid JSON ({exc}); re-save the model") from None
    catalog = _scan(files, base_dir)
    nf4_shapes, quant_files = _prequant_shapes(config, catalog, base_dir)
    if nf4_shapes and base == "original":
        raise ConfigError(f"{base_dir} is a 4-bit checkpoint: it holds no original weights; use base='quantized'",
                          "merge options")
    adapter = read_adapter(adapter_dir)
    _validate_adapter(adapter, catalog, nf4_shapes, config)

    nf4_modules = _linear_modules(base_dir) if base == "quantized" else set()
    items: list[_Item] = []
    for key, (file, shape, src_dtype) in catalog.items():
        if key in quant_files:
            continue  # bnb quant-state keys: folded into the dequantized weight
        nf4 = key in nf4_shapes
        out_dtype = dtype if (nf4 or src_dtype.is_floating_point) else src_dtype
        module = key.removesuffix(".weight") if key.endswith(".weight") else None
        items.append(_Item(key, file, nf4_shapes.get(key, shape), out_dtype, module in adapter.lora_A,
                           module in nf4_modules and len(shape) == 2 and src_dtype.is_floating_point, nf4))

    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:  # greedy, in reading order, like transformers' save_pretrained
        if shards[-1] and size + it.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    headers = []
    for index, shard in enumerate(shards):
        offset = 0
        for it in sorted(shard, key=lambda t: -t.dtype.itemsize):  # wider dtypes first keeps data aligned
            it.shard, it.offset = index, offset
            offset += it.nbytes
        headers.append(_safetensors_header(sorted(shard, key=lambda t: t.offset)))
    return _Plan(files, items, names, headers, adapter, config, quant_files)


# ---- writing -------------------------------------------------------------------------------------

class _ShardWriter:
    """Output shards with precomputed headers; tensors land at their offsets; a full shard is closed."""

    def __init__(self, directory: Path, plan: _Plan):
        self.paths = [directory / name for name in plan.shard_names]
        self.headers = plan.headers
        self.remaining = [0] * len(plan.shard_names)
        for it in plan.items:
            self.remaining[it.shard] += 1
        self.fds: dict[int, int] = {}
        self.bytes_written = 0

    def write(self, item: _Item, tensor: torch.Tensor) -> None:
        fd = self.fds.get(item.shard)
        if fd is None:
            fd = self.fds[item.shard] = os.open(self.paths[item.shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, self.headers[item.shard])
        view = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        position = len(self.headers[item.shard]) + item.offset
        while view.nbytes:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
        self.bytes_written += item.nbytes
        self.remaining[item.shard] -= 1
        if self.remaining[item.shard] == 0:
            os.close(self.fds.pop(item.shard))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _merge_input_shard(file: Path, plan: _Plan, writer: _ShardWriter, base: BaseKind, quant: QuantConfig,
                       progress: Any) -> None:
    """Every output tensor whose source lies in `file`, one at a time."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as handle:
        for item in (it for it in plan.items if it.file == file):
            module = item.name.removesuffix(".weight")
            try:
                if item.nf4:
                    state = {k: _read(k, file, handle, plan) for k in plan.quant_files if k.startswith(item.name + ".")}
                    state[item.name] = handle.get_tensor(item.name)
                    w = NF4Weight.from_state_dict(state, item.name, backend="torch").dequantize(torch.float32)
                else:
                    w = handle.get_tensor(item.name)
                    if item.quantized:
                        w = NF4Weight.from_tensor(w, quant.blocksize, quant.double_quant, backend="torch",
                                                  name=item.name).dequantize(torch.float32)
                if item.merge:
                    w = w.to(torch.float32, copy=not (item.nf4 or item.quantized)).add_(plan.adapter.delta_weight(module))
            except ValueError as exc:
                raise CheckpointError(f"{file.name}: {exc}") from None
            out = _cast_checked(item.name, w, item.dtype, merged=item.merge)
            del w
            writer.write(item, out)
            progress.update(item.nbytes)


def _read(key: str, file: Path, handle: Any, plan: _Plan) -> torch.Tensor:
    if plan.quant_files[key] == file:
        return handle.get_tensor(key)
    from safetensors import safe_open

    with safe_open(str(plan.quant_files[key]), framework="pt", device="cpu") as other:
        return other.get_tensor(key)


def _write_metadata(tmp: Path, base_dir: Path, plan: _Plan, dtype_name: str) -> None:
    config = dict(plan.config)
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(plan.shard_names) > 1:
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {it.name: plan.shard_names[it.shard] for it in sorted(plan.items, key=lambda t: t.name)}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for pattern in _SIDE_FILES:
        for source in sorted(base_dir.glob(pattern)):
            if source.is_file():
                shutil.copy2(source, tmp / source.name)


class _PeakRSS:
    """Samples this process's resident set size every 10 ms in a background thread."""

    def __enter__(self) -> _PeakRSS:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float16",
          base: BaseKind = "quantized", quant: QuantConfig = QuantConfig(), max_shard_size: int | str = "2GB",
          overwrite: bool = False, verify: bool = False, progress: bool = True) -> MergeReport:
    """Merge the adapter into the base checkpoint, streaming shard by shard, into a 16/32-bit HF checkpoint.

    base="quantized" (default) merges onto dequantize(quantize(W0)) with `quant`, the weights the
    adapter was trained against; base="original" onto W0 itself. Everything is validated before the
    first byte is written; the output appears at `out_dir` only complete (temp dir, fsync, rename).
    """
    if dtype not in _OUT_DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be 'float16', 'bfloat16' or 'float32'", "merge options")
    if base not in ("quantized", "original"):
        raise ConfigError(f"base={base!r} must be 'quantized' or 'original'", "merge options")
    out_dtype, dtype_name = _OUT_DTYPES[dtype], str(_OUT_DTYPES[dtype]).removeprefix("torch.")
    max_bytes = parse_size(max_shard_size)
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out_dir.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise ConfigError(f"out_dir {out_dir} is one of the inputs; choose a new directory", "merge options")
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists; choose another output path or pass overwrite=True")
    plan = _plan(base_dir, adapter_dir, out_dtype, base, max_bytes)
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(parent).free < plan.total_bytes * 1.02 + 2**20:
        raise DiskFullError(28, f"merging needs {plan.total_bytes / 1e9:.2f} GB in {parent} but only "
                            f"{shutil.disk_usage(parent).free / 1e9:.2f} GB are free; free space or choose another out_dir")

    from tqdm.auto import tqdm

    start = time.perf_counter()
    verification = None
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, plan)
        with _PeakRSS() as rss, tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging",
                                     disable=not progress) as bar:
            try:
                for file in plan.files:
                    _merge_input_shard(file, plan, writer, base, quant, bar)
            finally:
                writer.close()
        _write_metadata(tmp, base_dir, plan, dtype_name)
        seconds = time.perf_counter() - start
        if verify:  # a checkpoint that fails verification is never published
            verification = verify_merge(tmp, base_dir, adapter_dir, quant=quant, base=base)
    merged = sum(it.merge for it in plan.items)
    roundtrip = sum((it.quantized or it.nf4) and not it.merge for it in plan.items)
    return MergeReport(out_dir, merged, len(plan.items) - merged - roundtrip, roundtrip, writer.bytes_written,
                       seconds, writer.bytes_written / seconds / 1e9, rss.peak, len(plan.shard_names), dtype_name,
                       base, sum(f.stat().st_size for f in plan.files), verification)


# ---- verification ----------------------------------------------------------------------------------

def _reference_model(base_dir: Path, adapter_dir: Path, quant: QuantConfig, base: BaseKind) -> nn.Module:
    """base + adapter through qlora_lite, computing in fp32."""
    if base == "quantized":
        model, _ = load_model(base_dir, quant=quant, lora=None, device="cpu", compute_dtype=torch.float32,
                              with_tokenizer=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        for module in read_adapter(adapter_dir).modules:
            linear = model.get_submodule(module)
            bias = None if linear.bias is None else linear.bias.detach()
            replace_module(model, module, LoRALinear4bit(DenseWeight(linear.weight.detach()), bias, adapter_name=None))
    load_adapter(model, adapter_dir)
    return model


def _prompt_ids(merged_dir: Path, prompts: list[str] | None, vocab_size: int) -> list[torch.Tensor]:
    has_tokenizer = any(merged_dir.glob("tokenizer*.json")) or any(merged_dir.glob("*.model"))
    if not has_tokenizer:  # tiny test models: fixed random token ids
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 48), generator=generator) for _ in range(len(prompts or DEFAULT_PROMPTS))]
    tokenizer = load_tokenizer(merged_dir)
    return [tokenizer(text, return_tensors="pt").input_ids for text in (prompts or DEFAULT_PROMPTS)]


def verify_merge(merged_dir: str | Path, base_dir: str | Path, adapter_dir: str | Path,
                 prompts: list[str] | None = None, quant: QuantConfig = QuantConfig(),
                 max_abs_logit_diff: float | None = None, min_top1_agreement: float = 0.999,
                 base: BaseKind = "quantized") -> dict[str, Any]:
    """Compare the merged checkpoint (plain transformers, fp32) with base + adapter (qlora_lite, fp32).

    max_abs_logit_diff defaults by the merged dtype: 1e-2 (float32), 0.5 (float16), 2.0 (bfloat16).
    Raises VerificationError past either threshold, or if transformers reports missing/unexpected keys.
    """
    from transformers import AutoModelForCausalLM

    merged_dir, base_dir, adapter_dir = Path(merged_dir), Path(base_dir), Path(adapter_dir)
    saved = json.loads((merged_dir / "config.json").read_text()).get("dtype", "float32")
    merged, info = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32,
                                                        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise VerificationError(f"{merged_dir} does not load cleanly in transformers: {bad}")
    merged.eval()
    limit = max_abs_logit_diff if max_abs_logit_diff is not None else _DEFAULT_MAX_DIFF[_OUT_DTYPES[saved]]
    reference = _reference_model(base_dir, adapter_dir, quant, base)
    max_diff = total_diff = 0.0
    agree = positions = 0
    with torch.no_grad():
        for ids in _prompt_ids(merged_dir, prompts, merged.config.vocab_size):
            got = merged(input_ids=ids).logits.float()
            want = reference(input_ids=ids).logits.float()
            diff = (got - want).abs()
            max_diff, total_diff = max(max_diff, diff.max().item()), total_diff + diff.sum().item()
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            positions += ids.numel()
    result = {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": total_diff / positions / merged.config.vocab_size,
              "top1_agreement": agree / positions, "positions": positions, "merged_dtype": saved, "base": base,
              "max_abs_logit_diff_limit": limit, "min_top1_agreement": min_top1_agreement}
    if max_diff > limit or result["top1_agreement"] < min_top1_agreement:
        raise VerificationError(f"{merged_dir}: max |Δlogit| {max_diff:.4g} (limit {limit}), top-1 agreement "
                                f"{result['top1_agreement']:.4f} (minimum {min_top1_agreement}) against base + adapter; "
                                "the merge does not reproduce the adapter model (wrong base or quant settings?)")
    return result


# ---- in-memory merge for 16-bit bases ---------------------------------------------------------------

def merge_adapter(model: nn.Module, name: str | None = None) -> list[str]:
    """W += s·B·A (fp32, then cast) in every LoRA layer with a 16/32-bit base; returns the merged paths.

    While merged, a layer computes with W alone (its active adapter is None); `unmerge_adapter` undoes it.
    """
    layers = {p: l for p, l in lora_layers(model).items() if (name or l.active_adapter) in l.adapters
              and getattr(l, "merged_adapter", None) is None}
    if not layers:
        raise MergeError(f"no unmerged adapter {name!r} to merge; loaded: "
                         f"{sorted({a for l in lora_layers(model).values() for a in l.adapters})}")
    nf4 = [p for p, l in layers.items() if not isinstance(l.base, DenseWeight)]
    if nf4:
        raise MergeError(f"{nf4[0]} (and {len(nf4) - 1} more) have a 4-bit NF4 base: merging s·B·A into 4 bits "
                         "rounds the update away (each weight can only land on one of 16 levels per block; this is "
                         "how PEFT's merge_and_unload on a 4-bit model loses a fine-tune). Use "
                         "qlora_lite.merge.merge(base_dir, adapter_dir, out_dir) to write a 16-bit merged checkpoint")
    for path, layer in layers.items():
        adapter = name or layer.active_adapter
        w = layer.base.weight
        layer.base = DenseWeight(_cast_checked(f"{path}.weight", w.float() + layer.delta_weight(adapter), w.dtype, True))
        layer.merged_adapter, layer.active_adapter = adapter, None
    return list(layers)


def unmerge_adapter(model: nn.Module) -> list[str]:
    """Subtract s·B·A again and reactivate the adapter (exact up to one rounding of W in its dtype)."""
    undone = []
    for path, layer in lora_layers(model).items():
        adapter = getattr(layer, "merged_adapter", None)
        if adapter is None:
            continue
        w = layer.base.weight
        layer.base = DenseWeight((w.float() - layer.delta_weight(adapter)).to(w.dtype))
        layer.merged_adapter, layer.active_adapter = None, adapter
        undone.append(path)
    return undone
