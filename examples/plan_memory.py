"""Plan a run before loading any weight: will Llama-3-8B fit a 24 GB card, and how long can sequences be?"""

from qlora_lite.config import LoraConfig
from qlora_lite.memory import estimate_memory
from qlora_lite.memory_fit import fit_to_budget

estimate = estimate_memory("llama-3-8b", seq_len=4096, batch_size=1, lora=LoraConfig(r=16))
print(estimate.to_table())
fit = fit_to_budget("llama-3-8b", "RTX4090", batch_size=1, lora=LoraConfig(r=16))
print(f"\nlongest sequence at batch 1 on an RTX 4090: {fit.value} tokens")
