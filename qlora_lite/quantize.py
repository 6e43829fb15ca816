"""`qlora-lite quantize`: write a base model's NF4 checkpoint in the transformers + bitsandbytes 4-bit layout.

    model dir (16/32-bit shards) ──► per tensor, read alone: linear weight (not the head) ──► NF4Weight.state_dict()
                                                             anything else ──────────────► as stored
    ──► temp dir: model-0000k-of-0000n.safetensors (each ≤ max_shard_size) + model.safetensors.index.json
        + config.json with a bitsandbytes `quantization_config` + tokenizer files ──► fsync, rename to out_dir

Streaming, like `merge`: the host holds one input tensor and the output shard being filled, never the
model; an output shard is written and dropped as soon as the next tensor would overflow it (one tensor's
NF4 state stays in one shard). The result loads here without re-quantizing (`load_model`) and in
transformers with bitsandbytes, and is byte for byte what quantizing at load makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import QuantConfig
from .errors import CheckpointError
from .fsutil import atomic_directory, refuse_output_over_inputs
from .inject import find_targets
from .load import build_skeleton, checkpoint_files
from .nf4 import NF4Weight
from .shards import ShardReader, parse_size

__all__ = ["write_quantized"]

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
           "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


class _ShardedOutput:
    """Collects tensors into output shards of at most `max_bytes` (a larger group gets a shard of its own),
    saving each full shard under a temporary name; `finish()` names them k-of-n and writes the index."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.saved: list[tuple[Path, list[str]]] = []

    def add(self, group: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending.update({k: v.contiguous() for k, v in group.items()})
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = self.directory / f"part-{len(self.saved):05d}.safetensors"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.saved.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Save the last shard and give all their final names; returns the number of shards."""
        if self.pending or not self.saved:
            self._flush()
        if len(self.saved) == 1:
            self.saved[0][0].rename(self.directory / "model.safetensors")
            return 1
        weight_map = {}
        for k, (part, keys) in enumerate(self.saved):
            name = f"model-{k + 1:05d}-of-{len(self.saved):05d}.safetensors"
            part.rename(self.directory / name)
            weight_map |= dict.fromkeys(keys, name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return len(self.saved)


def write_quantized(model_dir: str | Path, out_dir: str | Path, blocksize: int = 64, double_quant: bool = True,
                    overwrite: bool = False, max_shard_size: int | str = "2GB") -> Path:
    """Quantize every linear but the LM head to NF4, one tensor at a time, into shards of `out_dir`
    no larger than `max_shard_size` (bytes or e.g. '500MB', '2GB'); `out_dir` appears only complete."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    refuse_output_over_inputs(out_dir, {"model": model_dir})  # --out X --overwrite true replaced the original
    files = checkpoint_files(model_dir)
    skeleton, _config, prequant = build_skeleton(model_dir, torch.bfloat16)
    if prequant is not None:
        raise CheckpointError(f"{model_dir} is already quantized (its config.json has a quantization_config); "
                              "pass the 16/32-bit model")
    linears = set(find_targets(skeleton, "all-linear"))
    del skeleton
    quant = QuantConfig(blocksize=blocksize, double_quant=double_quant, backend="torch")
    dtypes: set[str] = set()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        output = _ShardedOutput(tmp, max_bytes)
        for file in files:
            with ShardReader(file) as reader:
                for key in reader.keys():
                    tensor = reader.get(key)
                    module, _, leaf = key.rpartition(".")
                    if leaf == "weight" and module in linears:
                        dtypes.add(str(tensor.dtype).removeprefix("torch."))
                        q = NF4Weight.from_tensor(tensor, quant.blocksize, quant.double_quant, quant.backend,
                                                  name=key)
                        output.add(q.state_dict(prefix=f"{key}."))
                    else:
                        output.add({key: tensor})
                    del tensor
        output.finish()
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = _bnb_config(double_quant, sorted(dtypes)[0] if dtypes else "bfloat16")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _COPIED:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    return out_dir


def _bnb_config(double_quant: bool, compute_dtype: str) -> dict:
    """The `quantization_config` transformers writes for a bitsandbytes 4-bit NF4 model."""
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False, "_load_in_4bit": True, "_load_in_8bit": False,
    }
