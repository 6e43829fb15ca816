"""GGUF export agreement (issue 23, docs/data.md "Downstream tools"): merge → llama.cpp's converter → transformers.

A base model gets a LoRA adapter with random B (so the merge changes every adapted weight), is merged to fp16
by qlora-lite, converted by scripts/export_gguf.sh (llama.cpp's convert_hf_to_gguf.py) to each GGUF type, and
each GGUF is loaded back with transformers (`from_pretrained(dir, gguf_file=...)`, dequantized to fp32). Both
models run on DEFAULT_PROMPTS (~1000 tokens of fixed English text and code) in fp32; reported per type:
max |Δlogit| against the merged checkpoint, top-1 agreement, mean KL(merged ‖ gguf), how many tensors are
bit-equal, the GGUF's `llama.rope.freq_base` beside config.json's rope_theta, file size and conversion time.

    python benchmarks/bench_gguf.py --model embedded        # SmolLM2-135M-Instruct (rope_theta 100,000)
    python benchmarks/bench_gguf.py --model tiny            # the tests' tiny Llama with SmolLM2's tokenizer

Needs the converter: scripts/export_gguf.sh --fetch (or QLORA_LITE_GGUF_CONVERTER).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import versions  # noqa: E402


def random_adapter(base_dir: Path, adapter_dir: Path, r: int = 8, std: float = 1e-3) -> None:
    """A PEFT-format adapter on every projection of `base_dir` with uniform A and normal B (seed 0)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter_dir.mkdir()
    generator, tensors = torch.Generator().manual_seed(0), {}
    with safe_open(str(next(base_dir.glob("*.safetensors"))), "pt") as handle:
        for key in handle.keys():
            if key.endswith("_proj.weight"):
                out_f, in_f = handle.get_slice(key).get_shape()
                module = f"base_model.model.{key.removesuffix('.weight')}"
                bound = 1 / math.sqrt(in_f)
                tensors[f"{module}.lora_A.weight"] = (torch.rand(r, in_f, generator=generator) * 2 - 1) * bound
                tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, r, generator=generator) * std
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), {"format": "pt"})
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "bias": "none", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]}))


def compare(merged_dir: Path, gguf_file: Path, ids: torch.Tensor) -> dict:
    import gguf
    from transformers import AutoModelForCausalLM

    config = json.loads((merged_dir / "config.json").read_text())
    reader = gguf.GGUFReader(str(gguf_file))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits[0], loaded(input_ids=ids).logits[0]
    ours, theirs = merged.state_dict(), loaded.state_dict()
    return {
        "rope_freq_base": float(reader.get_field("llama.rope.freq_base").contents()),
        "config_rope_theta": config.get("rope_theta"),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "max_abs_dlogit": (got - want).abs().max().item(),
        "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "mean_kl": torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                              reduction="none").sum(-1).mean().item(),
        "bit_equal_tensors": f"{sum(torch.equal(ours[k], theirs[k]) for k in ours if k in theirs)}/{len(ours)}",
        "gguf_mib": round(gguf_file.stat().st_size / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from qlora_lite.embedded import embedded_model_dir
    from qlora_lite.merge import merge
    from qlora_lite.verify import DEFAULT_PROMPTS

    embedded = embedded_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = embedded
        if args.model == "tiny":
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import write_tiny_model

            base = write_tiny_model(tmp / "base", tokenizer_dir=embedded,
                                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
        random_adapter(base, tmp / "adapter")
        merge(base, tmp / "adapter", tmp / "merged", dtype="float16", progress=False)
        ids = AutoTokenizer.from_pretrained(str(embedded))("\n\n".join(DEFAULT_PROMPTS), return_tensors="pt").input_ids
        results = {"model": args.model, "tokens": ids.shape[1],
                   "versions": versions(("torch", "transformers", "gguf", "safetensors", "sentencepiece")),
                   "converter": (ROOT / ".llama.cpp" / "VERSION").read_text().strip()
                   if (ROOT / ".llama.cpp" / "VERSION").is_file() else "QLORA_LITE_GGUF_CONVERTER"}
        for kind in args.types:
            out = tmp / f"merged-{kind}.gguf"
            t0 = time.perf_counter()
            script = ROOT / "scripts" / "export_gguf.sh"
            subprocess.run(["bash", str(script), str(tmp / "merged"), str(out), kind], check=True, capture_output=True)
            results[kind] = {"convert_s": round(time.perf_counter() - t0, 1), **compare(tmp / "merged", out, ids)}
            print(json.dumps({kind: results[kind]}), flush=True)
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
