"""Configuration dataclasses, validated in `__post_init__`.

Each config collects *every* problem and raises one `ConfigError` (a `ValueError`), so a
user fixes a YAML file in one pass instead of one error per run. Field names follow PEFT
(`r`, `lora_alpha`, `lora_dropout`, `target_modules`, `use_rslora`, `init_lora_weights`)
and transformers' `TrainingArguments` where those libraries have the same notion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .data.schemas import check_columns
from .errors import ConfigError
from .init import INIT_METHODS, needs_weight
from .dtypes import DTYPE_BY_NAME, FLOAT_DTYPES
from .nf4 import SUPPORTED_BLOCKSIZES
from .tracking import check_trackers

__all__ = [
    "QuantConfig",
    "LoraConfig",
    "TrainConfig",
    "SUPPORTED_BLOCKSIZES",
    "resolve_dtype",
    "resolve_lora_dtype",
    "config_from_dict",
    "load_yaml_config",
]



def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """Map a dtype name (or "auto") to a torch dtype.

    "auto" is bf16 on a CUDA device that supports it, fp16 on older GPUs and fp32 on CPU,
    where 16-bit matmuls are slower than fp32 ones on most machines.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPE_BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPE_BY_NAME))} or 'auto'") from None


def resolve_lora_dtype(lora_dtype: str | torch.dtype, compute_dtype: torch.dtype,
                       device: str | torch.device | None) -> torch.dtype:
    """The LoRA factors' dtype. "auto" (the default) is the compute dtype on CUDA: no call casts A and B,
    and the factors, their gradients and (torch AdamW) states take half the bytes, as the QLoRA paper
    trained; fp32 elsewhere (CPU 16-bit matmuls are slow). bitsandbytes' AdamW keeps 32-bit states either way."""
    if lora_dtype == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return compute_dtype if on_cuda else torch.float32
    return resolve_dtype(lora_dtype)


def _check_dtype(problems: list[str], field_name: str, value: Any, allow_auto: bool = True) -> None:
    if isinstance(value, torch.dtype):
        if value not in FLOAT_DTYPES:
            problems.append(f"{field_name}={value} is not a floating dtype we compute in")
        return
    allowed = set(DTYPE_BY_NAME) | ({"auto"} if allow_auto else set())
    if value not in allowed:
        problems.append(f"{field_name}={value!r} is not one of {sorted(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base weights are stored: NF4, blockwise, optionally double-quantized.

    Frozen: a shared instance (a default argument, a run's settings) cannot be changed under its users.

    Args:
        blocksize: values per absmax block (bitsandbytes': 32 to 4096; QLoRA: 64)
        double_quant: the absmax values 8-bit quantized in blocks of 256 (4.127 instead of 4.5 bits/param)
        compute_dtype: the dtype the weights are dequantized to for the matmuls (auto: bf16 on a GPU that has it,
            fp16 on older ones, fp32 on CPU)
        backend: the kernels: auto (triton where it imports: bitsandbytes' kernels with the CUDA dequantize
            in one Triton launch; else bitsandbytes; else torch), bitsandbytes, triton, or torch (pure
            PyTorch, bitsandbytes' CPU bytes); all give the same bytes
        quant_type: nf4 (the only one)
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    backend: Literal["auto", "bitsandbytes", "triton", "torch"] = "auto"
    quant_type: Literal["nf4"] = "nf4"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.blocksize) or self.blocksize not in SUPPORTED_BLOCKSIZES:
            problems.append(f"blocksize={self.blocksize!r} is not supported; use one of {SUPPORTED_BLOCKSIZES}")
        if not isinstance(self.double_quant, bool):
            problems.append(f"double_quant={self.double_quant!r} must be true or false")
        _check_dtype(problems, "compute_dtype", self.compute_dtype)
        if self.backend not in ("auto", "bitsandbytes", "triton", "torch"):
            problems.append(f"backend={self.backend!r} must be 'auto', 'bitsandbytes', 'triton' or 'torch'")
        if self.quant_type != "nf4":
            problems.append(f"quant_type={self.quant_type!r}: only 'nf4' is implemented")
        if problems:
            raise ConfigError(problems, "QuantConfig")


@dataclass
class LoraConfig:
    """LoRA adapter shape and initialisation, in PEFT's names (see docs/data.md, "LoRA defaults").

    Our defaults are not PEFT's (r=8, lora_alpha=8, lora_dropout=0, per-architecture targets): r=16 on
    every linear layer ("all-linear": the QLoRA paper found adapting all of them matters more than the
    rank), lora_alpha=2r (a scale of 2) and dropout 0.05 (QLoRA's value for its larger models).
    """

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    # kaiming/gaussian: B = 0; loftq, pissa, pissa_niter_N: A, B and the NF4 base from W0 (init.py)
    init_lora_weights: str = "kaiming"
    loftq_iter: int = 1  # LoftQ's alternating steps (PEFT's default)
    lora_dtype: str = "auto"  # the compute dtype on CUDA, fp32 on CPU (resolve_lora_dtype)
    use_dora: bool = False  # DoRA: a trained magnitude per output row (PEFT's use_dora)
    # mixture-of-experts projections (transformers 5's 3-D `experts.gate_up_proj`/`down_proj`), PEFT's
    # name: None adapts them all when target_modules is "all-linear" (an expert is a linear stored 3-D)
    # and none otherwise; a list of name suffixes ("mlp.experts.down_proj") picks some, [] none
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer (typical: 8, 16, 64)")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not (
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0
        ):
            problems.append(f"lora_alpha={self.lora_alpha!r} must be a positive number (typical: 2*r)")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not (
            0.0 <= self.lora_dropout < 1.0
        ):
            problems.append(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                problems.append("target_modules is empty; use 'all-linear', a list of names or a regex")
            elif targets != "all-linear" and not _looks_like_name(targets):
                try:
                    re.compile(targets)
                except re.error as exc:
                    problems.append(f"target_modules={targets!r} is not a valid regex: {exc}")
        elif isinstance(targets, (list, tuple)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                problems.append(f"target_modules={targets!r} must be a non-empty list of module names")
            else:
                self.target_modules = list(targets)
        else:
            problems.append(f"target_modules={targets!r} must be 'all-linear', a list of names or a regex")
        params = self.target_parameters
        if params is not None:
            if not isinstance(params, (list, tuple)) or not all(isinstance(t, str) and t for t in params):
                problems.append(f"target_parameters={params!r} must be a list of parameter names, e.g. "
                                "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")
            else:
                self.target_parameters = list(params)
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag}={getattr(self, flag)!r} must be true or false")
        if not isinstance(self.init_lora_weights, str) or not (
                self.init_lora_weights in ("kaiming", "gaussian") or needs_weight(self.init_lora_weights)):
            problems.append(f"init_lora_weights={self.init_lora_weights!r} must be one of {', '.join(INIT_METHODS)}")
        if not _is_int(self.loftq_iter) or self.loftq_iter < 1:
            problems.append(f"loftq_iter={self.loftq_iter!r} must be a positive integer (PEFT's default: 1)")
        _check_dtype(problems, "lora_dtype", self.lora_dtype)
        if problems:
            raise ConfigError(problems, "LoraConfig")

    @property
    def scaling(self) -> float:
        """s in y = W0 x + s·B A x: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        from .layers import lora_scaling  # lazily: config is the leaf every module imports; the layer owns the rule

        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)


def _looks_like_name(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", text) is not None


@dataclass
class TrainConfig:
    """One training run. Every field is also a CLI flag and a YAML key.

    Args:
        model: a Hugging Face model directory (16-bit or bnb-4bit safetensors), or "embedded"
        data: a local .jsonl/.json/.csv/.parquet file or folder, a save_to_disk folder, "embedded" (the shipped
            chat set), or several to mix: [{path: a.jsonl, weight: 0.7}, {path: b.parquet, weight: 0.3}]
        data_format: auto (detected per record), text, alpaca, sharegpt, messages or prompt_completion
        columns: rename fields, e.g. {instruction: question, output: answer} (see docs/data.md)
        data_cache_dir: where tokenized sets are cached (default: beside the `datasets` cache)
        data_num_proc: processes that tokenize a large set
        out_dir: where metrics.jsonl, checkpoints/ and adapter/ are written
        seq_len: tokens per sequence (longer examples are truncated, or refused with truncation=error)
        batch_size: sequences per process per micro-step
        global_batch_size: if set, batch_size = global_batch_size / (processes x grad_accum)
        grad_accum: micro-steps per optimizer step (gradients communicated once per step)
        max_steps: optimizer steps
        learning_rate: peak learning rate (QLoRA: 1e-4 to 2e-4)
        weight_decay: AdamW weight decay
        warmup_steps: linear warmup steps
        lr_schedule: cosine, linear or constant after the warmup
        max_grad_norm: gradient clipping norm (0 disables)
        optimizer: paged_adamw_32bit / paged_adamw_8bit (bitsandbytes, CUDA) or adamw
        gradient_checkpointing: recompute each block in backward (keeps only block inputs)
        fused_kernels: Liger Kernel's RMSNorm/RoPE/SwiGLU on CUDA (true: required; auto: where liger-kernel is
            installed and the model is Llama/Mistral/Qwen2; false: plain torch). Off by default: on an H200 they
            paid 1.29x at 8192 tokens per micro-batch and cost 0.82-0.85x at 2048 (docs/benchmarks.md)
        lean_ops: fewer launches with PyTorch alone and the model's own rounding, for the same models: RMSNorm
            through PyTorch's fused kernel (one each way on CUDA instead of ~20), RoPE in 4 ops each way
            instead of 5 and 7. auto: on CUDA, for what Liger does not take; true: on any device; false: off
        compile: torch.compile each decoder layer (regional compilation; compiles at the first step)
        loss_chunk_tokens: cross-entropy through the LM head this many tokens at a time (0: full logits)
        offload_activations: keep each checkpointed block's input in pinned host memory, copied out on a
            side CUDA stream and back (prefetched a block ahead) for the backward (offload.py; needs
            gradient_checkpointing)
        mlp_chunk_tokens: run each block's MLP over chunks of this many sequence positions, so one chunk's
            token x intermediate tensors live at a time (0: off; e.g. 4096 for sequences past 16k)
        offload_base: keep the decoder layers' NF4 base in pinned host memory and copy each layer's to the
            GPU just before its forward and its backward recompute, one layer ahead on a side stream (offload.py;
            a 70B model on a 24 GB card; needs gradient_checkpointing and an NF4 base, one process, no fsdp)
        packing: pack several examples into one sequence
        packing_mode: isolated (examples do not attend to each other) or concat (plain causal, cross-talk)
        truncation: truncate or error for examples longer than seq_len
        eval_fraction: share of the records held out for evaluation
        eval_every: evaluate every N steps (and at the end)
        save_every: checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)
        keep_last: checkpoints kept
        log_every: a metrics.jsonl line every N steps (evals and the last step always)
        seed: data order, LoRA init and dropout
        device: auto, cpu, cuda or cuda:N
        resume: continue from the newest checkpoint in out_dir (refused if its base, quantization or LoRA
            settings differ from this run's)
        overwrite_output_dir: start a new run in an out_dir that holds a previous one, removing its
            metrics.jsonl, adapter/, memory.json and checkpoints/ (without it such an out_dir is refused)
        fsdp: shard the NF4 base, LoRA and optimizer state over the processes (FSDP2)
        progress: show a progress bar
        report_to: trackers to log to through accelerate: any of tensorboard, wandb, mlflow, trackio (offline)
        quant: NF4 settings, or null for 16-bit LoRA
        lora: LoRA settings (PEFT's names)
    """

    model: str = "embedded"
    data: str | list[dict[str, Any]] = "embedded"
    data_format: str = "auto"
    columns: dict[str, str] | None = None
    data_cache_dir: str | None = None
    data_num_proc: int = 1
    out_dir: str = "runs/train"
    seq_len: int = 256
    batch_size: int = 2
    global_batch_size: int | None = None
    grad_accum: int = 1
    max_steps: int = 100
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    max_grad_norm: float = 0.3
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw"] = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    fused_kernels: bool | Literal["auto"] = False
    lean_ops: bool | Literal["auto"] = "auto"
    compile: bool = False
    loss_chunk_tokens: int = 1024
    offload_activations: bool = False
    mlp_chunk_tokens: int = 0
    offload_base: bool = False
    packing: bool = False
    packing_mode: Literal["isolated", "concat"] = "isolated"
    truncation: Literal["truncate", "error"] = "truncate"
    eval_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite_output_dir: bool = False
    fsdp: bool = False
    progress: bool = True
    report_to: list[str] = field(default_factory=list)
    quant: QuantConfig | None = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, cls in (("quant", QuantConfig), ("lora", LoraConfig)):
            if isinstance(getattr(self, name), dict):
                try:
                    setattr(self, name, config_from_dict(cls, getattr(self, name)))
                except ConfigError as exc:  # report nested problems together with ours
                    problems += [f"{name}.{p}" for p in exc.problems]
        positive_ints = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every",
                         "keep_last", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not _is_int(self.loss_chunk_tokens) or self.loss_chunk_tokens < 0:
            problems.append(f"loss_chunk_tokens={self.loss_chunk_tokens!r} must be a non-negative integer (0: off)")
        if not _is_int(self.mlp_chunk_tokens) or self.mlp_chunk_tokens < 0:
            problems.append(f"mlp_chunk_tokens={self.mlp_chunk_tokens!r} must be a non-negative integer (0: off)")
        if self.offload_activations is True and self.gradient_checkpointing is False:
            problems.append("offload_activations=true offloads the checkpointed blocks' inputs: it needs "
                            "gradient_checkpointing=true")
        if self.compile is True and (self.offload_activations is True or self.mlp_chunk_tokens
                                     or self.offload_base is True):
            problems.append("compile=true with offload_activations, offload_base or mlp_chunk_tokens is not supported "
                            "yet (their hooks and nested checkpoints are untested under torch.compile): set "
                            "compile: false")
        if self.offload_base is True and self.gradient_checkpointing is False:
            problems.append("offload_base=true fetches each layer's base again for the backward's recompute: it "
                            "needs gradient_checkpointing=true")
        if self.offload_base is True and self.fsdp is True:
            problems.append("offload_base=true keeps the whole NF4 base in one process's host memory; fsdp=true "
                            "shards it over GPUs instead: choose one")
        if self.offload_base is True and self.quant is None:
            problems.append("offload_base=true offloads the NF4 base, and quant=null trains a 16-bit base: set "
                            "quant or offload_base: false")
        if self.global_batch_size is not None and (not _is_int(self.global_batch_size) or self.global_batch_size <= 0):
            problems.append(f"global_batch_size={self.global_batch_size!r} must be a positive integer or null")
        for name in ("fused_kernels", "lean_ops"):
            if getattr(self, name) not in (True, False, "auto"):
                problems.append(f"{name}={getattr(self, name)!r} must be true, false or auto")
        for name in ("fsdp", "resume", "overwrite_output_dir", "progress", "gradient_checkpointing", "packing",
                     "compile", "offload_activations", "offload_base"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be true or false")
        if not isinstance(self.learning_rate, (int, float)) or isinstance(self.learning_rate, bool) or not (
            math.isfinite(self.learning_rate) and self.learning_rate > 0
        ):
            problems.append(f"learning_rate={self.learning_rate!r} must be a positive number (QLoRA: 1e-4 to 2e-4)")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            problems.append(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        elif _is_int(self.max_steps) and self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        if self.lr_schedule not in ("cosine", "constant", "linear"):
            problems.append(f"lr_schedule={self.lr_schedule!r} must be 'cosine', 'constant' or 'linear'")
        if isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, (int, float)) or not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0
        ):
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be a finite number >= 0 (0 disables clipping)")
        if self.optimizer not in ("paged_adamw_32bit", "paged_adamw_8bit", "adamw"):
            problems.append(f"optimizer={self.optimizer!r} must be 'paged_adamw_32bit', 'paged_adamw_8bit' or 'adamw'")
        if self.truncation not in ("truncate", "error"):
            problems.append(f"truncation={self.truncation!r} must be 'truncate' or 'error'")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction={self.eval_fraction!r} must be in [0, 1)")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:  # torch generators overflow past 2**63 (+ epoch)
            problems.append(f"seed={self.seed!r} must be an integer from 0 to 4294967295")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(self.device)):
            problems.append(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        problems += check_columns(self.columns, self.data_format)
        if self.packing_mode not in ("isolated", "concat"):
            problems.append(f"packing_mode={self.packing_mode!r} must be 'isolated' or 'concat'")
        if not _is_int(self.data_num_proc) or self.data_num_proc < 1:
            problems.append(f"data_num_proc={self.data_num_proc!r} must be a positive integer")
        problems += check_trackers(self.report_to)
        if self.quant is not None and not isinstance(self.quant, (QuantConfig, dict)):
            problems.append("quant must be a QuantConfig, a mapping, or null for 16-bit LoRA")
        init = getattr(self.lora, "init_lora_weights", "kaiming")
        if isinstance(init, str) and needs_weight(init):
            if self.quant is None:
                problems.append(f"lora.init_lora_weights={init!r} initialises from the NF4 quantization error; it "
                                "needs quant (use kaiming for 16-bit LoRA)")
            if self.fsdp is True:
                problems.append(f"lora.init_lora_weights={init!r} is not supported with fsdp yet (its NF4 base is "
                                "saved by one process); train on one process or use kaiming")
        if problems:
            raise ConfigError(problems, "TrainConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def per_process_batch(self, world_size: int) -> int:
        """Sequences per process per micro-step: `batch_size`, or `global_batch_size` split evenly."""
        if self.global_batch_size is None:
            return self.batch_size
        share = world_size * self.grad_accum
        if self.global_batch_size % share:
            raise ConfigError([f"global_batch_size={self.global_batch_size} does not divide into {world_size} "
                               f"process(es) x grad_accum {self.grad_accum}; use a multiple of {share} (e.g. "
                               f"{share * max(1, round(self.global_batch_size / share))}) or set batch_size per process"],
                              "TrainConfig")
        return self.global_batch_size // share


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping, naming unknown keys and suggesting the close match."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
        raise ConfigError(problems, cls.__name__)
    return cls(**values)


def load_yaml_config(path: str | Path) -> TrainConfig:
    """Read a YAML run file into a `TrainConfig` (nested `quant:` and `lora:` sections)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file", "run file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # e.g. a tab or an unclosed quote: name the line, not a scanner traceback
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where} is not valid YAML ({getattr(exc, 'problem', None) or exc}); fix the "
                          "syntax", "run file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of options, got {type(data).__name__}", "run file")
    return config_from_dict(TrainConfig, data)
