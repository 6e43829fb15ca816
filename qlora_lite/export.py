"""Write a base model's NF4 checkpoint in the transformers + bitsandbytes 4-bit layout.

    model dir (16/32-bit shards) ──► per tensor: linear weight (not the head) ──► NF4Weight.state_dict()
                                                  anything else ──────────────► as stored
    ──► model.safetensors + config.json with a bitsandbytes `quantization_config`

The result loads here without re-quantizing (`load_model`) and in transformers with bitsandbytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import QuantConfig
from .fsutil import atomic_directory, refuse_output_over_inputs
from .load import _build_skeleton, checkpoint_files, read_safetensors_keys
from .inject import find_targets
from .nf4 import NF4Weight

__all__ = ["write_quantized"]

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
           "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def write_quantized(model_dir: str | Path, out_dir: str | Path, blocksize: int = 64, double_quant: bool = True,
                    overwrite: bool = False) -> Path:
    """Quantize every linear but the LM head to NF4, tensor by tensor, into `out_dir`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    refuse_output_over_inputs(out_dir, {"model": model_dir})  # --out X --overwrite true replaced the original
    files = checkpoint_files(model_dir)
    skeleton, _config, prequant = _build_skeleton(model_dir, torch.bfloat16)
    if prequant is not None:
        raise ValueError(f"{model_dir} is already quantized")
    linears = set(find_targets(skeleton, "all-linear"))
    quant = QuantConfig(blocksize=blocksize, double_quant=double_quant, backend="torch")
    tensors: dict[str, torch.Tensor] = {}
    dtypes: set[str] = set()
    for file in files:
        keys = read_safetensors_keys(file)
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                tensor = handle.get_tensor(key)
                module, _, leaf = key.rpartition(".")
                if leaf == "weight" and module in linears:
                    dtypes.add(str(tensor.dtype).removeprefix("torch."))
                    q = NF4Weight.from_tensor(tensor, quant.blocksize, quant.double_quant, quant.backend, name=key)
                    tensors.update({k: v.contiguous() for k, v in q.state_dict(prefix=f"{key}.").items()})
                else:
                    tensors[key] = tensor.contiguous()
    config = json.loads((model_dir / "config.json").read_text())
    compute = sorted(dtypes)[0] if dtypes else "bfloat16"
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False, "_load_in_4bit": True, "_load_in_8bit": False,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _COPIED:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    return out_dir
