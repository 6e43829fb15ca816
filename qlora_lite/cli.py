"""The `qlora-lite` command.

Built on jsonargparse (as litgpt is): each subcommand's flags come from the signature of the
function or dataclass it runs, so the CLI, the YAML run files and the Python API cannot drift
apart. `train --config run.yaml` reads a YAML file whose keys are `TrainConfig`'s fields; any
flag overrides it. Errors a user can fix print as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "demo": "qlora-lite demo                      # ~2-3 min on a laptop CPU\n"
            "  qlora-lite demo --out runs/mine --steps 60",
    "train": "qlora-lite train --config examples/finetune_7b.yaml\n"
             "  qlora-lite train --model ./Llama-2-7b-hf --data chat.jsonl --lora.r 64 --max_steps 1000\n"
             "  qlora-lite train --config run.yaml --resume true",
    "merge": "qlora-lite merge --base ./Llama-2-7b-hf --adapter runs/x/adapter --out ./merged --verify true",
    "memory": "qlora-lite memory --model llama-2-7b --seq_len 2048 --rank 16 --gpu RTX4090\n"
              "  qlora-lite memory --model llama-3-8b --seq_len 8192 --recipe peft --gpu A100-80GB\n"
              "  qlora-lite memory --model llama-3-8b --seq_len 65536 --gpu RTX4090 --offload_activations true "
              "--mlp_chunk_tokens 4096\n"
              "  qlora-lite memory --model llama-2-70b --gpu RTX4090 --offload_base true\n"
              "  qlora-lite memory --model ./my-model --json true",
    "analyze": "qlora-lite analyze --adapter runs/x/adapter --compare runs/y/adapter --out analysis/",
    "quantize": "qlora-lite quantize --model ./Llama-2-7b-hf --out ./Llama-2-7b-nf4",
    "generate": "qlora-lite generate --adapter runs/x/adapter --prompt 'What is the capital of France?'",
}


def demo(out: str | None = None, steps: int = 20, seq_len: int = 128, batch_size: int = 4,
         learning_rate: float = 1e-3, rank: int = 16) -> None:
    """Fine-tune the embedded SmolLM2-135M in 4-bit, merge to fp16, and report (writes into --out)."""
    from .demo import run_demo

    run_demo(out, steps, seq_len, batch_size, learning_rate, rank)


def merge(base: str, adapter: str, out: str, dtype: str = "float16", base_kind: str | None = None,
          blocksize: int | None = None, double_quant: bool | None = None, max_shard_size: str = "2GB",
          overwrite: bool = False, verify: bool = False, force: bool = False, json_output: bool = False) -> None:
    """Merge an adapter into its base model and write a standard fp16/bf16 HF checkpoint.

    Args:
        base: the base model directory the adapter was trained on
        adapter: the adapter directory (adapter_config.json + adapter_model.safetensors [+ qlora_lite.json])
        out: the output directory (refused if it exists, unless --overwrite true)
        dtype: float16, bfloat16 or float32
        base_kind: "quantized" merges onto dequantize(quantize(W0)), what QLoRA training saw; "original" onto W0;
            default: what the adapter was trained on (qlora_lite.json)
        blocksize: NF4 block size; default: the adapter's (qlora_lite.json), which a different value is refused against
        double_quant: double quantization; default: the adapter's, as blocksize
        max_shard_size: largest output shard, e.g. 2GB
        overwrite: replace an existing output directory
        verify: load the result and compare its logits with base + adapter
        force: merge onto a base whose fingerprint differs from the one recorded with the adapter
        json_output: print the report as JSON
    """
    from .merge import merge as run_merge

    report = run_merge(base, adapter, out, dtype=dtype, base=base_kind, max_shard_size=max_shard_size,
                       quant={"blocksize": blocksize, "double_quant": double_quant}, overwrite=overwrite,
                       verify=verify, force=force)
    print(json.dumps(asdict(report), default=str, indent=2) if json_output else report.summary())


def memory(model: str, seq_len: int = 2048, batch_size: int = 1, rank: int = 16, gpu: str | None = None,
           optimizer: str = "paged_adamw_32bit", world_size: int = 1, fsdp: bool = False, json_output: bool = False,
           plot: str | None = None, recipe: str = "qlora-lite", lora_dtype: str = "auto",
           offload_activations: bool = False, mlp_chunk_tokens: int = 0, link_gbps: float = 25.0,
           offload_base: bool = False) -> None:
    """Predict a run's GPU memory before loading any weight; say whether it fits and what does.

    Args:
        model: a model directory, a config.json, or a built-in shape (llama-2-7b, llama-3-8b, mistral-7b, ...)
        seq_len: tokens per sequence
        batch_size: sequences per step
        rank: LoRA rank on all linear layers
        gpu: a GPU name (RTX4090, A100-80GB, ...) or a size (24GB) to check the fit against
        optimizer: paged_adamw_32bit, paged_adamw_8bit or adamw
        world_size: number of GPUs
        fsdp: shard the quantized base across the GPUs
        json_output: print the estimate as JSON
        plot: write a stacked bar chart PNG here
        recipe: qlora-lite, or peft to predict transformers + bitsandbytes + PEFT for the same run (ours beside it)
        lora_dtype: auto (the compute dtype on CUDA), bfloat16, float16 or float32
        offload_activations: the checkpointed block inputs in pinned host memory (reports the host bytes
            and the host<->GPU copies per step)
        mlp_chunk_tokens: the MLP over chunks of this many positions (0: off; e.g. 4096 at long context)
        link_gbps: host<->GPU link speed in GB/s the copy time is given at (PCIe 4.0 x16: 25)
        offload_base: the decoder layers' NF4 base in pinned host memory, two layers' on the GPU at a time
            (reports the host bytes and the host->GPU copies per step)
    """
    from .memory_fit import memory_report

    print(memory_report(model, seq_len=seq_len, batch_size=batch_size, rank=rank, gpu=gpu, optimizer=optimizer,
                        world_size=world_size, fsdp=fsdp, json_output=json_output, plot=plot, recipe=recipe,
                        lora_dtype=lora_dtype, offload_activations=offload_activations,
                        mlp_chunk_tokens=mlp_chunk_tokens, link_gbps=link_gbps, offload_base=offload_base))


def analyze(adapter: str, base: str | None = None, compare: str | None = None, out: str = "analysis",
            json_output: bool = False, force: bool = False) -> None:
    """The LoRA paper's analyses of an adapter: accounting, ΔW spectrum, subspace similarity, amplification.

    Args:
        adapter: adapter directory to analyse
        base: the base model directory (enables amplification and quantization-error analyses)
        compare: a second adapter (e.g. another rank or seed) for subspace similarity
        out: directory for report.md, report.json and plots
        json_output: print the report as JSON
        force: analyse against a base whose fingerprint differs from the one recorded with the adapter
    """
    from .analysis import analyze_command

    print(analyze_command(adapter, base=base, compare=compare, out=out, json_output=json_output, force=force))


def quantize(model: str, out: str, blocksize: int = 64, double_quant: bool = True, max_shard_size: str = "2GB",
             overwrite: bool = False) -> None:
    """Write a model's NF4 checkpoint in the bitsandbytes/transformers 4-bit layout, so later runs skip quantizing.

    Args:
        model: a Hugging Face model directory (16/32-bit safetensors)
        out: output directory (loads with qlora-lite and with transformers + bitsandbytes)
        blocksize: NF4 block size
        double_quant: also quantize the block scales (4.127 instead of 4.5 bits/param)
        max_shard_size: largest output shard, e.g. 2GB (written one at a time)
        overwrite: replace an existing output directory
    """
    from .quantize import write_quantized

    path = write_quantized(model, out, blocksize=blocksize, double_quant=double_quant, overwrite=overwrite,
                           max_shard_size=max_shard_size)
    print(f"wrote NF4 checkpoint to {path}")


def generate(prompt: str, model: str | None = None, adapter: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, force: bool = False) -> None:
    """Answer one prompt with the NF4 base (+ an adapter), for a quick look.

    Args:
        prompt: the user message
        model: a model directory, or "embedded" for the shipped SmolLM2-135M-Instruct; default: the adapter's
            base (qlora_lite.json), else embedded
        adapter: an adapter directory to apply (its base is rebuilt with the recorded quantization and dtype)
        max_new_tokens: answer length limit
        temperature: 0 for greedy decoding
        seed: sampling seed
        force: use a model whose fingerprint differs from the one recorded with the adapter
    """
    from .adapter import load_adapter
    from .config import LoraConfig
    from .embedded import embedded_model_dir
    from .generate import answer, check_temperature
    from .load import load_model
    from .settings import check_base, quant_for, read_settings

    check_temperature(temperature)  # before minutes of loading
    settings = read_settings(adapter) if adapter else None
    if model is None:
        recorded = settings.base.get("path") if settings else None
        model = recorded if recorded and os.path.isdir(recorded) else "embedded"
    path = embedded_model_dir() if model == "embedded" else model
    check_base(settings, path, force)
    quant = quant_for(settings, None, adapter or ".")
    dtype = settings.compute_dtype if settings else "auto"
    # a 16-bit run's linears stay 16-bit, LoRA layers on its targets (load_model's quant=None needs a lora)
    lora = LoraConfig(**settings.lora) if quant is None else None
    net, tokenizer = load_model(path, quant, lora=lora, compute_dtype=dtype)
    if adapter:
        load_adapter(net, adapter)
    print(answer(net, tokenizer, prompt, max_new_tokens, temperature, seed))


def _train(cfg) -> None:
    import torch
    import torch.distributed as dist

    from .threads import pick_threads
    from .train import train

    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        # a step is hundreds of small ops ending at OpenMP barriers: no more threads than idle cores
        torch.set_num_threads(pick_threads(max_threads=max(1, (os.cpu_count() or 1)
                                                           // int(os.environ.get("WORLD_SIZE", "1")))))
    result = train(cfg)
    if dist.is_available() and dist.is_initialized():
        # the process is ours: leave the group together, so no rank's gloo/nccl threads see a peer vanish
        # (on an error we just exit; the launcher stops the other ranks)
        dist.barrier()
        dist.destroy_process_group()
    if result.interrupted:
        raise SystemExit(130)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.steps} steps; adapter: {result.adapter_dir}; final loss {result.losses[-1]:.4f}")


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .config import TrainConfig

    parser = ArgumentParser(prog="qlora-lite", description="QLoRA fine-tuning: NF4 base, LoRA adapters, "
                            "streaming merge, memory planner.", exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subcommands(dest="command")
    for name, fn in [("demo", demo), ("merge", merge), ("memory", memory), ("analyze", analyze),
                     ("quantize", quantize), ("generate", generate)]:
        sub = ArgumentParser(description=f"{fn.__doc__.splitlines()[0]}\n\nexamples:\n  {EXAMPLES.get(name, '')}",
                             exit_on_error=False)
        sub.add_function_arguments(fn, as_group=False)
        commands.add_subcommand(name, sub, help=fn.__doc__.splitlines()[0])
    train_parser = ArgumentParser(description=f"Fine-tune with LoRA on an NF4 base.\n\nexamples:\n  {EXAMPLES['train']}",
                                  exit_on_error=False)
    train_parser.add_argument("--config", action=ActionConfigFile, help="a YAML run file (TrainConfig's keys)")
    train_parser.add_class_arguments(TrainConfig, nested_key=None, as_group=False)
    commands.add_subcommand("train", train_parser, help="fine-tune with LoRA on an NF4 base (--config run.yaml)")
    return parser


def _check_run_file(argv: list[str]) -> None:
    """Name a YAML key typo and suggest the close match before the parser sees the file."""
    if not argv or argv[0] != "train" or "--config" not in argv:
        return
    index = argv.index("--config")
    if index + 1 < len(argv):
        from .config import load_yaml_config

        load_yaml_config(argv[index + 1])


_FUNCTIONS = {"demo": demo, "merge": merge, "memory": memory, "analyze": analyze, "quantize": quantize,
              "generate": generate}


def _bool_flags(command: str) -> set[str]:
    import dataclasses
    import inspect

    from .config import LoraConfig, QuantConfig, TrainConfig

    if command == "train":
        return {prefix + f.name for prefix, cls in (("", TrainConfig), ("lora.", LoraConfig), ("quant.", QuantConfig))
                for f in dataclasses.fields(cls) if f.type == "bool"}
    fn = _FUNCTIONS.get(command)
    return {n for n, p in inspect.signature(fn).parameters.items() if p.annotation in ("bool", bool)} if fn else set()


def normalize_flags(argv: list[str]) -> list[str]:
    """Accept the spellings people type: `--world-size 2` is `--world_size 2`, a bare `--fsdp` is `--fsdp true`."""
    flags = _bool_flags(argv[0]) if argv else set()
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            arg = f"--{name}{eq}{value}"
            following = argv[i + 1] if i + 1 < len(argv) else None
            if not eq and name in flags and (following is None or following.startswith("--")):
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = normalize_flags(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv or os.environ.get("QLORA_LITE_DEBUG") == "1"
    if "--debug" in argv:
        argv.remove("--debug")
    parser = build_parser()
    try:
        _check_run_file(argv)
        args = parser.parse_args(argv)
        command = args.command
        sub = args[command].as_dict()
        sub.pop("config", None)
        if command == "train":
            from .config import TrainConfig, config_from_dict

            _train(config_from_dict(TrainConfig, sub))
        else:
            _FUNCTIONS[command](**sub)
        return 0
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for what a user can fix; --debug for the rest
        from .errors import QLoraLiteError

        from jsonargparse import ArgumentError

        if debug or not isinstance(exc, (QLoraLiteError, ValueError, FileNotFoundError, KeyError, OSError,
                                         ArgumentError)):
            raise
        message = str(exc).strip().splitlines()
        print(f"error: {' '.join(line.strip() for line in message)}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
