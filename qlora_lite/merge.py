"""Streaming merge of a LoRA adapter into its base checkpoint, exported as a normal HF checkpoint.

    base_dir/ (config.json + *.safetensors, or bnb-4bit)     adapter_dir/ (PEFT format)
        │ shard headers only: names, shapes, dtypes               │ read_adapter: A, B, s
        ▼                                                         ▼
    plan + validate everything: adapter modules exist as 2-D weights with matching in/out, every
    shard readable, the output layout (shard names, offsets) fixed         ── nothing written yet
        │
        ▼
    for each input shard, one tensor at a time (plain reads: nothing stays mapped or cached):
        linear W0 ──► NF4 quantize ──► dequantize fp32 ─┐    (base="original": W0 in fp32)
        bnb-4bit W ──► NF4Weight.from_state_dict ──► fp32 ┤
                                  target: + s·B·A (fp32) ┴─► finite / range check ──► cast
        other tensor ──────────────────────────────────────► range check ──► cast (floats only)
        │   written straight to its offset in the output shard; a shard is closed once full
        ▼
    temp dir: model-0000k-of-0000n.safetensors + index.json + config.json (new dtype, no
    quantization_config) + tokenizer files ──► [verify_merge] ──► fsync ──► rename to out_dir

W is what training computed with: every linear that load_model holds in NF4 (all but the LM head)
becomes dequantize(quantize(W0)); adapted ones add s·B·A; one rounding to the output dtype.
Mixture-of-experts weights keep the checkpoint's per-expert tensors: expert e's gate and up halves
are quantized together, as load_model holds gate_up_proj[e], and get rows of s·B_e·A_e (experts.py).
Host memory: the adapter plus a few copies of the largest tensor; output bytes go straight to disk.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import BASE_NAME, AdapterFile, read_adapter
from .config import QuantConfig
from .dtypes import dtype_from_name, safetensors_code
from .errors import CheckpointError, ConfigError, MergeError, MergeOverflowError, VerificationError
from .experts import ExpertSource, expert_source, fused_experts_modules
from .fsutil import DiskFullError, RunLock, atomic_directory, refuse_existing, refuse_output_over_inputs
from .init import needs_weight
from .inject import find_targets, lora_layers
from .load import (build_skeleton, check_bnb_nf4, check_tied_head, checkpoint_files, release_free_memory,
                   tensor_catalog, tied_head)
from .nf4 import NF4Weight
from .rss import PeakRSS
from .settings import check_base, quant_for, read_settings
from .shards import ShardReader, parse_size
from .verify import BaseKind, verify_merge

__all__ = ["merge", "merge_weight", "merge_adapter", "unmerge_adapter", "parse_size", "MergeReport", "MergeError",
           "MergeOverflowError", "VerificationError"]

_QUANT_KEY = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$")
_SIDE_FILES = ("tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "*.model", "chat_template*",
               "generation_config.json", "vocab.json", "vocab.txt", "merges.txt")


@dataclass
class MergeReport:
    out_dir: Path
    merged_modules: int
    copied_tensors: int  # cast only
    dequantized_tensors: int  # non-adapted linears, written as training saw them: dequantize(NF4(W0))
    bytes_written: int
    seconds: float
    gb_per_s: float  # tensor bytes written per second of the whole merge (plan, read, quantize, add, write, fsync)
    peak_rss_bytes: int
    shards: int = 1
    dtype: str = "float16"
    base: str = "quantized"
    bytes_read: int = 0
    verification: dict[str, Any] | None = None

    def summary(self) -> str:
        text = (f"merged {self.merged_modules} modules, {self.dequantized_tensors} NF4-dequantized linears, "
                f"{self.copied_tensors} copied tensors -> {self.shards} {self.dtype} shard(s) at {self.out_dir}: "
                f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s ({self.gb_per_s:.3f} GB/s), "
                f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")
        if self.verification:
            v = self.verification
            text += (f"; verified: max |Δlogit| {v['max_abs_logit_diff']:.3g}, top-1 agreement "
                     f"{v['top1_agreement']:.4f} ({v['top1_agreement_up_to_ties']:.4f} up to ties)")
        return text


@dataclass
class _Item:
    """One output tensor: where it comes from, what happens to it, where it goes."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    merge: bool  # + s·B·A
    quantized: bool  # held in NF4 by training: written as dequantize(quantize(W0))
    nf4: bool  # stored bnb-4bit in the base checkpoint
    expert: ExpertSource | None = None  # a mixture-of-experts tensor: where it sits in the fused experts
    sibling: tuple[str, Path] | None = None  # the other half of expert e's gate_up (key, shard)
    shard: int = 0
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Plan:
    files: list[Path]
    items: list[_Item]
    shard_names: list[str]
    headers: list[bytes]
    adapter: AdapterFile
    config: dict[str, Any]
    quant_keys: dict[str, Path]  # bnb quant-state key -> its shard

    @property
    def total_bytes(self) -> int:
        return sum(it.nbytes for it in self.items)


def merge_weight(w0: torch.Tensor, delta: torch.Tensor, base: BaseKind = "quantized",
                 quant: QuantConfig | None = None, name: str = "weight") -> torch.Tensor:
    """fp32 dequantize(quantize(W0)) + s·B·A (what training saw); base="original": W0 + s·B·A."""
    if base == "quantized":
        quant = quant or QuantConfig()
        w = NF4Weight.from_tensor(w0, quant.blocksize, quant.double_quant, backend="torch",
                                  name=name).dequantize(torch.float32)
    else:
        w = w0.to(torch.float32, copy=True)
    return w.add_(delta.to(w.device, torch.float32))


def _cast_checked(name: str, w: torch.Tensor, dtype: torch.dtype, merged: bool) -> torch.Tensor:
    """Cast to `dtype`; a merged tensor must be finite and no cast may overflow.

    One aminmax pass decides both: NaN and inf propagate through it, and rounding is monotonic, so
    the extreme values overflow iff some value does (~30x cheaper than isfinite().all() on CPU).
    """
    if not w.is_floating_point() or w.numel() == 0:
        return w
    low, high = (v.item() for v in torch.aminmax(w))
    peak = max(abs(low), abs(high))
    if not (math.isfinite(low) and math.isfinite(high)):  # load_model refuses such a base too
        cause = "the adapter or the base weight is not finite" if merged else "the base checkpoint stores it so"
        raise MergeError(f"{name}: the merged weight contains NaN or inf ({cause}); re-download or re-save the "
                         "base, or check the adapter, e.g. a diverged training run")
    if math.isinf(torch.tensor(peak, dtype=torch.float32).to(dtype).item()):
        raise MergeOverflowError(f"{name}: values reach {peak:.6g}, beyond {str(dtype)[6:]}'s range (float16 max "
                                 "65504); merge with dtype='bfloat16' (float32's range) or dtype='float32'")
    return w.to(dtype)


# ---- planning: everything is read and checked before anything is written ------------------------

def _prequant_shapes(config: dict, catalog: dict, base_dir: Path) -> dict[str, tuple[int, ...]]:
    """For a bnb-4bit checkpoint: the logical shape of each packed weight (from its quant state)."""
    if check_bnb_nf4(config.get("quantization_config"), f"{base_dir}/config.json") is None:
        return {}
    shapes = {}
    for key, (file, _shape, dtype) in catalog.items():
        if dtype == torch.uint8 and key.endswith(".weight"):
            meta_key = f"{key}.quant_state.bitsandbytes__nf4"
            if meta_key not in catalog or f"{key}.absmax" not in catalog:
                kind = "an FP4" if f"{key}.quant_state.bitsandbytes__fp4" in catalog else "an incomplete"
                raise CheckpointError(f"{file}: {key} is a 4-bit weight with {kind} quant state; only complete "
                                      "NF4 bitsandbytes checkpoints can be merged")
            with ShardReader(catalog[meta_key][0]) as reader:
                try:
                    shapes[key] = tuple(json.loads(bytes(reader.get(meta_key).numpy()))["shape"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{file}: unreadable quant state {meta_key} ({exc}); re-save it") from None
    return shapes


def _expert_shapes(catalog: dict, experts: set[str]) -> dict[tuple[str, str], dict[int, tuple[int, int]]]:
    """(experts module, projection) -> expert -> its (out, in) as the checkpoint stores it (halves summed)."""
    shapes: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}
    for key, (_file, shape, _dtype) in catalog.items():
        source = expert_source(key)
        if source is None or source.experts not in experts:
            continue
        found = shapes.setdefault((source.experts, source.projection), {})
        if source.expert is None:
            found.update({e: tuple(shape[1:]) for e in range(shape[0])})
        else:
            rows = found.get(source.expert, (0, shape[1]))[0]
            found[source.expert] = (rows + shape[0] if source.part is not None else shape[0], shape[1])
    return shapes


def _validate_adapter(adapter: AdapterFile, catalog: dict, nf4_shapes: dict, config: dict,
                      experts: set[str] | None = None) -> None:
    unsupported = [k for k in ("fan_in_fan_out",) if adapter.config.get(k)]
    if unsupported:
        raise CheckpointError(f"{adapter.path}: adapters with {unsupported} are not supported by merge")
    problems = []
    expert_shapes = _expert_shapes(catalog, experts or set())
    for module in [m for m in adapter.modules if m in adapter.experts]:
        found = expert_shapes.get(tuple(module.rsplit(".", 1)), {})
        want = (adapter.lora_B[module].shape[0], adapter.lora_A[module].shape[1])
        if sorted(found) != list(range(adapter.experts[module])) or any(s != want for s in found.values()):
            problems.append(f"{module}: adapter is {adapter.experts[module]} experts of out={want[0]} x in={want[1]}, "
                            f"the base checkpoint has {len(found)} experts of {sorted(set(found.values()))}")
    for module in [m for m in adapter.modules if m not in adapter.experts]:
        key, a, b = f"{module}.weight", adapter.lora_A[module], adapter.lora_B[module]
        shape = nf4_shapes.get(key, catalog[key][1] if key in catalog else None)
        if shape is None:
            tied = module.endswith("lm_head") and config.get("tie_word_embeddings")
            tied = " (tied to the input embeddings)" if tied else ""
            problems.append(f"{module}: no weight {key} in the base checkpoint{tied}")
        elif len(shape) != 2:
            problems.append(f"{module}: base weight has shape {list(shape)}, not a 2-D linear weight")
        elif (b.shape[0], a.shape[1]) != tuple(shape):
            problems.append(f"{module}: adapter is out={b.shape[0]} x in={a.shape[1]}, base weight is {list(shape)}")
    if problems:
        raise CheckpointError(f"{adapter.path} does not fit the base checkpoint ({len(problems)} problems, e.g. "
                              + "; ".join(problems[:5]) + "); merge it into the base model it was trained on")


def _skeleton_facts(base_dir: Path) -> tuple[set[str], tuple[str, str] | None, set[str]]:
    """From a meta-device skeleton: the linears load_model stores in NF4 (every nn.Linear but the LM head),
    the tied (head, embedding) weight keys, as load_model sees them, and the fused experts modules."""
    skeleton, _config, _prequant = build_skeleton(base_dir)
    return set(find_targets(skeleton, "all-linear")), tied_head(skeleton), set(fused_experts_modules(skeleton))


def _plan(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, base: BaseKind, max_bytes: int) -> _Plan:
    files = checkpoint_files(base_dir)  # missing shards, bad index: CheckpointError naming the file
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{base_dir}/config.json is not valid JSON ({exc}); re-save the model") from None
    entries = tensor_catalog(base_dir)  # tensors stored twice, an index that disagrees with the shards: refused
    catalog = {key: (file, entry.shape, entry.dtype) for key, (file, entry) in entries.items()}
    nf4_shapes = _prequant_shapes(config, catalog, base_dir)
    if nf4_shapes and base == "original":
        raise ConfigError(f"{base_dir} is a 4-bit checkpoint without original weights; use base='quantized'",
                          "merge options")
    adapter = read_adapter(adapter_dir)
    if adapter.base_file is not None and base == "original":
        raise ConfigError(f"{adapter_dir} was initialised with LoftQ/PiSSA and trained on the NF4 base stored in "
                          f"{adapter.base_file.name}, not on W0; use base='quantized' (or leave it out)", "merge options")
    linears, tied, experts = _skeleton_facts(base_dir)
    if experts and nf4_shapes:
        raise CheckpointError(f"{base_dir} is a 4-bit mixture-of-experts checkpoint; merge into the 16-bit one "
                              "(bitsandbytes defines no 4-bit layout for fused experts)")
    _validate_adapter(adapter, catalog, nf4_shapes, config, experts)
    check_tied_head(base_dir, entries, tied)  # as load_model: never publish a silently dropped head
    in_nf4 = linears if base == "quantized" else set()
    quant_keys = {k: v[0] for k, v in catalog.items() if nf4_shapes and _QUANT_KEY.search(k)}
    halves = {tuple(source): key for key in catalog if (source := expert_source(key)) is not None
              and source.part is not None}
    items = []
    for key, (file, shape, src) in catalog.items():
        if key in quant_keys:
            continue  # folded into the dequantized weight
        module, nf4 = key.removesuffix(".weight"), key in nf4_shapes
        source = expert_source(key)
        if source is not None and source.experts in experts:
            sibling = None
            if source.part is not None:  # gate and up of one expert are quantized as one matrix
                other = halves.get((*source[:3], 1 - source.part))
                if other is None:
                    raise CheckpointError(f"{file}: {key} has no other half ({'up' if source.part == 0 else 'gate'}) "
                                          "in the base checkpoint; it is incomplete")
                sibling = other, catalog[other][0]
            items.append(_Item(key, file, shape, dtype, f"{source.experts}.{source.projection}" in adapter.lora_A,
                               base == "quantized", False, source, sibling))
            continue
        items.append(_Item(key, file, nf4_shapes.get(key, shape), dtype if nf4 or src.is_floating_point else src,
                           key.endswith(".weight") and module in adapter.lora_A,
                           module in in_nf4 and len(shape) == 2 and src.is_floating_point, nf4))

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
        offset, header = 0, {"__metadata__": {"format": "pt"}}
        for it in sorted(shard, key=lambda t: -t.dtype.itemsize):  # wider dtypes first keeps every tensor aligned
            it.shard, it.offset = index, offset
            header[it.name] = {"dtype": safetensors_code(it.dtype), "shape": list(it.shape),
                               "data_offsets": [offset, offset + it.nbytes]}
            offset += it.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
        headers.append(len(blob).to_bytes(8, "little") + blob)
    return _Plan(files, items, names, headers, adapter, config, quant_keys)


# ---- writing -------------------------------------------------------------------------------------

class _ShardWriter:
    """Output shards with precomputed headers; each tensor lands at its offset; a full shard is closed."""

    def __init__(self, directory: Path, plan: _Plan):
        self.paths = [directory / name for name in plan.shard_names]
        self.headers = plan.headers
        self.remaining = [sum(it.shard == i for it in plan.items) for i in range(len(self.paths))]
        self.fds: dict[int, int] = {}
        self.bytes_written = 0

    def write(self, item: _Item, tensor: torch.Tensor) -> None:
        fd = self.fds.get(item.shard)
        if fd is None:
            fd = self.fds[item.shard] = os.open(self.paths[item.shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, self.headers[item.shard])
        view = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        position = len(self.headers[item.shard]) + item.offset
        try:
            while view.nbytes:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
        except OSError as exc:  # name the file; EFBIG is a file size limit (ulimit -f), ENOSPC a full disk
            hint = (": the file size limit (ulimit -f) is below the shard size; raise it or pass a smaller "
                    "--max_shard_size" if exc.errno == errno.EFBIG else "")
            raise OSError(exc.errno, f"writing {self.paths[item.shard].name} of the merged checkpoint at byte "
                          f"{position}: {exc.strerror}{hint}") from exc
        self.bytes_written += item.nbytes
        self.remaining[item.shard] -= 1
        if self.remaining[item.shard] == 0:
            os.close(self.fds.pop(item.shard))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _merge_input_shard(file: Path, plan: _Plan, writer: _ShardWriter, quant: QuantConfig, progress: Any) -> None:
    """Every output tensor whose source lies in `file`, one at a time (plain reads, nothing memory-mapped).

    Freed temporaries go back to the OS after each phase: glibc otherwise keeps them on its heap and
    fragmentation stacks several tensors' worth (240 MB 5-shard merge: peak RSS growth 108-124 MB
    without, 61 MB with).
    """
    with ShardReader(file) as reader:
        for item in (it for it in plan.items if it.file == file):
            if item.expert is not None:
                w = _merged_expert(reader, item, plan.adapter, quant)
                writer.write(item, _cast_checked(item.name, w, item.dtype, merged=item.merge))
                del w
                release_free_memory()
                progress.update(item.nbytes)
                continue
            try:
                own = plan.adapter.stored_base(item.name.removesuffix(".weight")) if item.merge else None
                if own is not None:  # LoftQ/PiSSA: the base it trained on, saved beside the adapter
                    if own.shape != torch.Size(item.shape):
                        raise ValueError(f"{item.name}: the NF4 base stored beside the adapter has shape "
                                         f"{list(own.shape)}, the checkpoint {list(item.shape)}")
                    nf4 = own
                elif item.nf4:
                    state = {}
                    for key, source in plan.quant_keys.items():
                        if key.startswith(item.name + "."):
                            with ShardReader(source) as other:
                                state[key] = other.get(key)
                    state[item.name] = reader.get(item.name)
                    nf4 = NF4Weight.from_state_dict(state, item.name, backend="torch")
                    del state
                elif item.quantized:
                    w0 = reader.get(item.name)
                    nf4 = NF4Weight.from_tensor(w0, quant.blocksize, quant.double_quant, backend="torch",
                                                name=item.name)
                    del w0
                    release_free_memory()
                w = nf4.dequantize(torch.float32) if own is not None or item.nf4 or item.quantized else \
                    reader.get(item.name)
                nf4 = None
                if item.merge:
                    w = plan.adapter.merged_weight(item.name.removesuffix(".weight"), w)
            except ValueError as exc:
                raise CheckpointError(f"{file.name}: {exc}") from None
            writer.write(item, _cast_checked(item.name, w, item.dtype, merged=item.merge))
            del w
            release_free_memory()
            progress.update(item.nbytes)


def _merged_expert(reader: ShardReader, item: _Item, adapter: AdapterFile, quant: QuantConfig) -> torch.Tensor:
    """An expert checkpoint tensor merged as training saw it: per expert e, dequantize(NF4(W_e)) + s·B_e·A_e,
    W_e being gate_up_proj[e] = cat(gate, up) (both halves read, quantized together, this half's rows kept)."""
    source, module = item.expert, f"{item.expert.experts}.{item.expert.projection}"
    own = reader.get(item.name)
    matrices = own.unbind(0) if source.expert is None else [own]
    if item.sibling is not None:
        with ShardReader(item.sibling[1]) as other_reader:
            other = other_reader.get(item.sibling[0])
        matrices = [torch.cat([own, other] if source.part == 0 else [other, own])]
    out = []
    for index, w0 in enumerate(matrices):
        e = index if source.expert is None else source.expert
        w = (NF4Weight.from_tensor(w0, quant.blocksize, quant.double_quant, backend="torch", name=item.name)
             .dequantize(torch.float32) if item.quantized else w0.to(torch.float32, copy=True))
        if item.merge:
            w.add_(adapter.expert_delta_weight(module, e))
        half = w.shape[0] // 2
        out.append(w if item.sibling is None else w[:half] if source.part == 0 else w[half:])
    return torch.stack(out) if source.expert is None else out[0]


def _write_metadata(tmp: Path, base_dir: Path, plan: _Plan, dtype_name: str) -> None:
    config = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config.update(_legacy_rope_keys(config))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(plan.shard_names) > 1:
        weight_map = {it.name: plan.shard_names[it.shard] for it in sorted(plan.items, key=lambda t: t.name)}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for pattern in _SIDE_FILES:
        for source in sorted(base_dir.glob(pattern)):
            if source.is_file():
                shutil.copy2(source, tmp / source.name)
    _chat_template_in_tokenizer_config(tmp)


def _legacy_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters` only; converters written before it (llama.cpp's
    convert_hf_to_gguf.py of early 2025) read the top-level `rope_theta` / `rope_scaling` and silently fall
    back to a base of 10,000 without them. Writing both keeps those tools right; transformers reads either."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    legacy = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {k: v for k, v in legacy.items() if k not in config}


def _chat_template_in_tokenizer_config(directory: Path) -> None:
    """Copy chat_template.jinja into tokenizer_config.json's `chat_template`, where tools older than
    transformers 4.43 (and llama.cpp's converter of that time) look for it."""
    template, settings = directory / "chat_template.jinja", directory / "tokenizer_config.json"
    if not (template.is_file() and settings.is_file()):
        return
    values = json.loads(settings.read_text())
    if "chat_template" not in values:
        values["chat_template"] = template.read_text()
        settings.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float16",
          base: BaseKind | None = None, quant: QuantConfig | dict | None = None, max_shard_size: int | str = "2GB",
          overwrite: bool = False, verify: bool = False, progress: bool = True, force: bool = False) -> MergeReport:
    """Merge the adapter into the base checkpoint, streaming tensor by tensor, into a 16/32-bit HF checkpoint.

    base="quantized" merges onto dequantize(quantize(W0)), the weights the adapter was trained against,
    with the blocksize and double quantization recorded beside the adapter (settings.py; `quant`, if given,
    must agree; an adapter without that file takes `quant` or the defaults). It always uses the pure-torch
    NF4 reference, which reproduces bitsandbytes' CPU bytes; quant.backend is not used. base="original"
    merges onto W0 itself; the default (None) is what training used: "original" for a 16-bit LoRA run.
    A base whose fingerprint differs from the recorded one is refused unless `force`. Everything
    is validated before the first byte is written; `out_dir` appears only complete (temp dir, fsync,
    rename), and with verify=True only if its logits match base + adapter (see verify_merge).
    """
    quant, base = _rebuild_settings(base_dir, adapter_dir, quant, base, force)
    if dtype_from_name(dtype) is None or base not in ("quantized", "original"):
        raise ConfigError(f"dtype={dtype!r} must be 'float16', 'bfloat16' or 'float32' and base={base!r} "
                          "'quantized' or 'original'", "merge options")
    out_dtype = dtype_from_name(dtype)
    max_bytes = parse_size(max_shard_size)
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    refuse_output_over_inputs(out_dir, {"base model": base_dir, "adapter": adapter_dir})
    refuse_existing(out_dir, overwrite)  # before planning; atomic_directory checks again at the commit
    with RunLock.beside(out_dir):  # a second merge into the same out_dir is refused while this one runs
        return _merge_locked(base_dir, adapter_dir, out_dir, out_dtype, base, quant, max_bytes, overwrite, verify,
                             progress)


def _merge_locked(base_dir: Path, adapter_dir: Path, out_dir: Path, out_dtype: torch.dtype, base: BaseKind,
                  quant: QuantConfig, max_bytes: int, overwrite: bool, verify: bool, progress: bool) -> MergeReport:
    start, verification, verify_s = time.perf_counter(), None, 0.0
    plan = _plan(base_dir, adapter_dir, out_dtype, base, max_bytes)
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < plan.total_bytes * 1.02 + 2**20:
        raise DiskFullError(28, f"the merged checkpoint needs {plan.total_bytes / 1e9:.2f} GB but {parent} has "
                            f"{free / 1e9:.2f} GB free; free space or choose another out_dir")

    from tqdm.auto import tqdm

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, plan)
        with PeakRSS() as rss, tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging",
                                     disable=not progress) as bar:
            try:
                for file in plan.files:
                    _merge_input_shard(file, plan, writer, quant, bar)
            finally:
                writer.close()
        _write_metadata(tmp, base_dir, plan, str(out_dtype)[6:])
        if verify:  # a checkpoint that fails verification is never published
            verify_s = time.perf_counter()
            verification = verify_merge(tmp, base_dir, adapter_dir, quant=quant, base=base, force=True)
            verify_s = time.perf_counter() - verify_s
    seconds = time.perf_counter() - start - verify_s  # planning, merging, fsync and rename; not verification
    merged = sum(it.merge for it in plan.items)
    dequantized = sum((it.quantized or it.nf4) and not it.merge for it in plan.items)
    return MergeReport(out_dir, merged, len(plan.items) - merged - dequantized, dequantized, writer.bytes_written,
                       seconds, writer.bytes_written / seconds / 1e9, rss.peak, len(plan.shard_names),
                       str(out_dtype)[6:], base, sum(f.stat().st_size for f in plan.files), verification)


def _rebuild_settings(base_dir, adapter_dir, quant, base, force) -> tuple[QuantConfig, BaseKind]:
    """The quantization and base kind that rebuild what the adapter trained on (settings.py), the base checked."""
    settings = read_settings(adapter_dir)
    check_base(settings, base_dir, force)
    method = (settings.lora.get("init_lora_weights") if settings else None) or "kaiming"
    if needs_weight(method) and not (Path(adapter_dir) / BASE_NAME).is_file():
        raise CheckpointError(f"{adapter_dir} was initialised with {method} and trained on its own NF4 base, but "
                              f"{BASE_NAME} is missing beside it; copy the whole adapter directory")
    recorded = quant_for(settings, quant, adapter_dir)
    if base is None:
        base = "original" if recorded is None else "quantized"
    elif base == "quantized" and recorded is None:
        raise ConfigError(f"{adapter_dir} was trained on the 16-bit base (quant: null), but base='quantized' was "
                          "passed; use base='original' (or leave it out)", "merge options")
    return recorded or QuantConfig(), base


# ---- in-memory merge for 16-bit bases ---------------------------------------------------------------

def merge_adapter(model: nn.Module, name: str | None = None) -> list[str]:
    """W += s·B·A (fp32, then cast) in every LoRA layer with a 16/32-bit base; returns the merged paths.

    While merged, a layer computes with W alone (its active adapter is None); `unmerge_adapter` undoes it.
    Unmerge before switching adapters: set_adapter on a merged model would add s·B·A a second time.
    """
    layers = {p: l for p, l in lora_layers(model).items()
              if (name or l.active_adapter) in l.adapters and getattr(l, "merged_adapter", None) is None}
    if not layers:
        raise MergeError(f"no unmerged adapter {name!r} to merge in this model")
    nf4 = [p for p, l in layers.items() if l.quantized]
    if nf4:
        raise MergeError(f"{nf4[0]} (and {len(nf4) - 1} more) have a 4-bit NF4 base: merging s·B·A into 4 bits "
                         "rounds the update away (each weight can only land on one of 16 levels per block; this is "
                         "how PEFT's merge_and_unload on a 4-bit model loses a fine-tune). Use "
                         "qlora_lite.merge.merge(base_dir, adapter_dir, out_dir) to write a 16-bit merged checkpoint")
    for path, layer in layers.items():
        adapter, w = name or layer.active_adapter, layer.weight
        magnitude = layer.magnitude(adapter)
        # DoRA: the row scale m/‖W0 + s·B·A‖ is kept so that unmerge can divide it out again
        layer.merged_scale = None if magnitude is None else magnitude / layer.weight_norm(adapter)
        merged = layer.merged_weight(adapter)
        layer.weight = nn.Parameter(_cast_checked(f"{path}.weight", merged, w.dtype, merged=True), requires_grad=False)
        layer.merged_adapter, layer.active_adapter = adapter, None
    return list(layers)


def unmerge_adapter(model: nn.Module) -> list[str]:
    """Subtract s·B·A again (DoRA: after dividing out the row scale) and reactivate the adapter (exact up
    to one rounding of W in its dtype)."""
    undone = []
    for path, layer in lora_layers(model).items():
        adapter = getattr(layer, "merged_adapter", None)
        if adapter is not None:
            w = layer.weight.float()
            if getattr(layer, "merged_scale", None) is not None:
                w = w / layer.merged_scale.unsqueeze(1)
            layer.weight = nn.Parameter((w - layer.delta_weight(adapter)).to(layer.weight.dtype), requires_grad=False)
            layer.merged_adapter, layer.active_adapter = None, adapter
            undone.append(path)
    return undone
