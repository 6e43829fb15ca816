"""What fits: the largest batch or sequence for a memory budget (`fit_to_budget`), the advice when nothing
does, and the `qlora-lite memory` report, all built on `memory.estimate_memory`.

    estimate_memory(config, seq_len, batch_size, ...) ──► required bytes ≤ budget?
        doubling, then bisection over batch_size or seq_len ──► FitResult (value, estimate, next step's)
        none fits ──► MemoryBudgetError naming what would (smaller r, 8-bit optimizer, FSDP, offload_base)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, Literal

from .config import LoraConfig
from .errors import ConfigError
from .memory import (_OPTIMIZERS, MemoryBudgetError, MemoryEstimate, Optimizer, Recipe, estimate_memory,
                     plot_estimate)
from .memory_arch import GiB, load_model_config, model_shape, parse_budget
from .memory_offload import PCIE4_X16_GBPS

__all__ = ["FitResult", "fit_to_budget", "largest_seq_len", "memory_report"]


@dataclass(frozen=True)
class FitResult:
    """The largest `varied` value (batch_size or seq_len) whose estimate fits the budget.

    The fit counts `required_bytes` against the budget: the tensors, ALLOCATOR_SLACK on top of
    them and the CUDA context (not the paged optimizer state, which can move to host memory). So
    the margin it keeps below the card is slack + context + `headroom_bytes`; `next_value` (one
    step more) is the smallest value that does not fit.
    """

    budget_bytes: int
    varied: Literal["batch_size", "seq_len"]
    value: int
    step: int
    estimate: MemoryEstimate
    next_estimate: MemoryEstimate  # value + step: does not fit (unless `capped`)
    capped: bool = False

    @property
    def next_value(self) -> int:
        return self.value + self.step

    @property
    def headroom_bytes(self) -> int:
        """Budget left over at `value`, beyond the context and slack the estimate already counts."""
        return self.budget_bytes - self.estimate.required_bytes


def fit_to_budget(config: Any, budget_bytes: int | str, *, seq_len: int | None = None,
                  batch_size: int | None = None, max_batch_size: int = 1 << 16, max_seq_len: int = 1 << 20,
                  seq_step: int = 64, **kwargs: Any) -> FitResult:
    """With `seq_len` fixed, the largest batch size; with `batch_size` fixed, the largest seq_len
    (a multiple of `seq_step`). Doubling, then bisection. Other keywords go to `estimate_memory`.
    Raises MemoryBudgetError (a ValueError) when even batch 1 / one step of seq_len does not fit,
    saying why and what would.
    """
    budget = parse_budget(budget_bytes)
    if (seq_len is None) == (batch_size is None):
        raise ConfigError("give exactly one of seq_len (to fit the batch size) or batch_size (to fit seq_len)",
                          "fit_to_budget")
    if seq_len is not None:
        varied, step, limit = "batch_size", 1, max_batch_size

        def at(units: int) -> MemoryEstimate:
            return estimate_memory(config, seq_len=seq_len, batch_size=units, **kwargs)
    else:
        varied, step, limit = "seq_len", seq_step, max(1, max_seq_len // seq_step)

        def at(units: int) -> MemoryEstimate:
            return estimate_memory(config, seq_len=seq_step * units, batch_size=batch_size, **kwargs)

    first = at(1)
    if first.required_bytes > budget:
        raise _budget_error(config, budget, first, kwargs)
    good, bad = 1, None
    while bad is None and good < limit:
        probe = min(2 * good, limit)
        if at(probe).required_bytes <= budget:
            good = probe
        else:
            bad = probe
    capped = bad is None
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if at(mid).required_bytes <= budget else (good, mid)
    return FitResult(budget, varied, good * step, step, at(good), at(good + 1), capped)


def largest_seq_len(config: Any, budget_bytes: int | str, *, batch_size: int = 1, seq_step: int = 64,
                    **kwargs: Any) -> tuple[int, int]:
    """(the largest seq_len that fits the budget, the next step up, which does not): what a GPU boundary
    test trains at and just beyond. Keywords as `fit_to_budget`/`estimate_memory`."""
    fit = fit_to_budget(config, budget_bytes, batch_size=batch_size, seq_step=seq_step, **kwargs)
    return fit.value, fit.next_value


def _budget_error(config: Any, budget: int, first: MemoryEstimate, kwargs: dict[str, Any]) -> MemoryBudgetError:
    over = first.required_bytes - budget
    base = dict(kwargs, seq_len=first.seq_len, batch_size=first.batch_size)
    lora = kwargs.get("lora", LoraConfig())

    def fits(**change: Any) -> MemoryEstimate | None:
        est = estimate_memory(config, **{**base, **change})
        return est if est.required_bytes <= budget else None

    frozen = first.quantized_weights + first.weights_16bit
    static = frozen + first.cuda_context
    why = (f"the NF4 weights alone are {first.quantized_weights / GiB:.2f} GiB + {first.weights_16bit / GiB:.2f} GiB "
           f"embeddings/head/norms{' (per rank)' if first.fsdp and first.world_size > 1 else ''}")
    ideas: list[str] = []
    if static <= budget:  # only then can a smaller adapter, optimizer or sequence help
        for r in (8, 4, 1):
            if r < lora.r and (est := fits(lora=dataclasses.replace(lora, r=r))):
                ideas.append(f"LoRA rank r={r} ({est.required_bytes / GiB:.2f} GiB)")
                break
        if first.optimizer == "paged_adamw_32bit" and (est := fits(optimizer="paged_adamw_8bit")):
            ideas.append(f"optimizer='paged_adamw_8bit' ({est.required_bytes / GiB:.2f} GiB)")
        if not kwargs.get("gradient_checkpointing", True) and (est := fits(gradient_checkpointing=True)):
            ideas.append(f"gradient checkpointing ({est.required_bytes / GiB:.2f} GiB)")
        if first.seq_len > 64 and fits(seq_len=64):
            best = fit_to_budget(config, budget, batch_size=first.batch_size, max_seq_len=first.seq_len, **kwargs)
            ideas.append(f"seq_len {best.value} at batch {first.batch_size}")
    if first.device == "cuda" and not (first.fsdp and first.world_size > 1):  # FSDP only where sharding helps
        for n in (2, 4, 8, 16, 32, 64):
            if (est := fits(world_size=n, fsdp=True)):
                ideas.append(f"FSDP over {n} GPUs ({est.required_bytes / GiB:.2f} GiB each)")
                break
        if not first.offload_base and first.quantized and (est := fits(offload_base=True)):
            ideas.append(f"offload_base: true ({est.required_bytes / GiB:.2f} GiB, "
                         f"{est.pinned_host_bytes / GiB:.2f} GiB pinned host memory)")
    advice = "; ".join(ideas) if ideas else "nothing smaller fits on this budget"
    message = (f"{first.model} does not fit: it needs {first.required_bytes / GiB:.2f} GiB at seq_len {first.seq_len} × "
               f"batch {first.batch_size}, {over / GiB:.2f} GiB over the {budget / GiB:.2f} GiB budget; {why}"
               f"{' on that budget' if static > budget else ''}. What would fit: {advice}")
    return MemoryBudgetError(message, first.required_bytes, budget, ideas)


# ---- report -----------------------------------------------------------------------------------


def _check_report_args(rank: Any, optimizer: Any, world_size: Any, fsdp: bool, recipe: Any) -> None:
    problems = []
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        problems.append(f"rank={rank!r} must be a positive integer (typical: 8, 16, 64)")
    if optimizer not in _OPTIMIZERS:
        close = difflib.get_close_matches(str(optimizer), _OPTIMIZERS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"optimizer={optimizer!r} is not one of {', '.join(_OPTIMIZERS)}{hint}")
    if fsdp and world_size == 1:
        problems.append("fsdp=true shards over several GPUs: give --world_size 2 or more (one GPU needs no FSDP)")
    if recipe not in ("qlora-lite", "peft"):
        close = difflib.get_close_matches(str(recipe), ("qlora-lite", "peft"), n=1, cutoff=0.5)
        problems.append(f"recipe={recipe!r} must be 'qlora-lite' or 'peft'" + (f" (did you mean {close[0]}?)" if close else ""))
    if problems:
        raise ConfigError(problems, "memory plan")


def memory_report(model: str, seq_len: int = 2048, batch_size: int = 1, rank: int = 16, gpu: str | None = None,
                  optimizer: Optimizer = "paged_adamw_32bit", world_size: int = 1, fsdp: bool = False,
                  json_output: bool = False, plot: str | None = None, recipe: Recipe = "qlora-lite",
                  lora_dtype: str = "auto", offload_activations: bool = False, mlp_chunk_tokens: int = 0,
                  link_gbps: float = PCIE4_X16_GBPS, lora_dropout: float = 0.05, offload_base: bool = False) -> str:
    """The body of `qlora-lite memory`: the breakdown table, and for a GPU whether it fits and the
    largest batch and seq_len that do. `json_output` returns JSON; `plot` writes a PNG there.
    `recipe="peft"` plans the peer's recipe and prints ours beside it. `offload_activations`,
    `mlp_chunk_tokens` plan the long-context options, `offload_base` the NF4 base in host memory;
    `link_gbps` is the host↔GPU speed (GB/s); `lora_dropout` (our default 0.05; PEFT's is 0) changes what each
    adapted linear saves (0 for a MoE model: expert adapters take no dropout)."""
    _check_report_args(rank, optimizer, world_size, fsdp, recipe)
    if model_shape(load_model_config(model)[0]).experts:
        lora_dropout = 0.0  # LoRA on experts takes no dropout (inject.check_experts), so a MoE run has none
    kwargs: dict[str, Any] = {"lora": LoraConfig(r=rank, lora_alpha=2 * rank, lora_dtype=lora_dtype,
                                                 lora_dropout=lora_dropout),
                              "optimizer": optimizer, "world_size": world_size, "fsdp": fsdp, "recipe": recipe,
                              "offload_activations": offload_activations, "mlp_chunk_tokens": mlp_chunk_tokens,
                              "link_gbps": link_gbps, "offload_base": offload_base}
    est = estimate_memory(model, seq_len=seq_len, batch_size=batch_size, **kwargs)
    result: dict[str, Any] = {"estimate": est.to_dict()}
    lines = [est.to_table()]
    if recipe == "peft":
        ours = estimate_memory(model, seq_len=seq_len, batch_size=batch_size, **{**kwargs, "recipe": "qlora-lite"})
        saving = est.total_bytes - ours.total_bytes
        result["qlora_lite_total_bytes"] = ours.total_bytes
        lines.append(f"qlora-lite for the same run: {ours.total_bytes / GiB:.2f} GiB, {saving / GiB:.2f} GiB "
                     f"({100 * saving / est.total_bytes:.0f}%) less than the peer's {est.total_bytes / GiB:.2f} GiB")
    capacity = parse_budget(gpu) if gpu else None
    if capacity is not None:
        margin = capacity - est.required_bytes
        verdict = (f"fits {gpu} ({capacity / GiB:.0f} GiB) with {margin / GiB:.2f} GiB to spare" if margin >= 0
                   else f"does NOT fit {gpu} ({capacity / GiB:.0f} GiB): {-margin / GiB:.2f} GiB over")
        if margin >= 0 and est.total_bytes > capacity:
            verdict += f", if {(est.total_bytes - capacity) / GiB:.2f} GiB of the paged optimizer state moves to host memory"
        result.update(gpu=gpu, capacity_bytes=capacity, fits=margin >= 0)
        lines.append(verdict + f" (the total counts {est.allocator_slack / GiB:.2f} GiB allocator slack and "
                     f"{est.cuda_context / GiB:.2f} GiB CUDA context)")
        positions = getattr(load_model_config(model)[0], "max_position_embeddings", None)
        for fixed, name in (({"seq_len": seq_len}, "batch_size"), ({"batch_size": batch_size}, "seq_len")):
            (key, value), = fixed.items()
            try:
                fit = fit_to_budget(model, capacity, **fixed, **kwargs)
            except MemoryBudgetError as exc:
                result[f"max_{name}"] = None
                lines.append(f"largest {name} at {key} {value}: none fits. {exc}")
                continue
            result[f"max_{name}"] = fit.value
            result[f"max_{name}_pinned_host_bytes"] = fit.estimate.pinned_host_bytes
            beyond = name == "seq_len" and positions and fit.value > positions
            host = (f", {fit.estimate.pinned_host_bytes / GiB:.2f} GiB pinned host memory at that length"
                    if fit.estimate.pinned_host_bytes else "")
            lines.append(f"largest {name} at {key} {value}: {fit.value} ({fit.estimate.required_bytes / GiB:.2f} GiB"
                         f"{host})" + (" (search limit)" if fit.capped else "")
                         + (f" (beyond the model's {positions} positions)" if beyond else ""))
    if plot:
        plot_estimate(est, plot, capacity_bytes=capacity, capacity_label=gpu or "capacity")
        result["plot"] = str(plot)
        lines.append(f"plot written to {plot}")
    return json.dumps(result, indent=2) if json_output else "\n".join(lines)
