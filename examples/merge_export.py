"""Merge a trained adapter into its base and export a standard fp16 checkpoint, then check it loads.

usage: python examples/merge_export.py BASE_DIR ADAPTER_DIR OUT_DIR
"""

import sys

from transformers import AutoModelForCausalLM

from qlora_lite.merge import merge

base_dir, adapter_dir, out_dir = sys.argv[1:4]
report = merge(base_dir, adapter_dir, out_dir, dtype="float16", verify=True)
print(report.summary())
model = AutoModelForCausalLM.from_pretrained(out_dir)  # any Hugging Face tool can load it now
print(f"loaded {sum(p.numel() for p in model.parameters()):,} parameters from {out_dir}")
