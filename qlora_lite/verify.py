"""Does a merged checkpoint compute what base + adapter computes? (`qlora-lite merge --verify true`)

    merged_dir ──► transformers AutoModelForCausalLM (fp32) ──┐
                                                              ├─► logits on DEFAULT_PROMPTS (~1000 tokens)
    base_dir + adapter_dir ──► qlora_lite, fp32 ──────────────┘      max |Δlogit|, top-1 agreement up to
                                                                      ties, vs thresholds set by the merged dtype

The reference is the model training computed with: the NF4 base (base="quantized") or W0
(base="original") plus the adapter. A failure raises `VerificationError`; `merge(verify=True)` then
never publishes the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .adapter import load_adapter, read_adapter
from .dtypes import dtype_from_name
from .config import QuantConfig
from .errors import VerificationError
from .experts import PROJECTIONS
from .inject import make_experts_layer, replace_module
from .layers import LoRALinear4bit
from .load import load_model, load_tokenizer
from .settings import check_base, quant_for, read_settings

__all__ = ["verify_merge", "top1_flips", "DEFAULT_PROMPTS"]

BaseKind = Literal["quantized", "original"]
DEFAULT_PROMPTS = (  # ~1000 tokens of fixed English text and code
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden press adapted from those used to make wine. Books, which had been copied "
    "by hand for centuries, could now be produced quickly and cheaply. Within a few decades printing shops had opened "
    "in most large European cities, and the spread of printed books helped to drive the Renaissance, the Reformation "
    "and the scientific revolution. Newspapers followed in the seventeenth century, and by the nineteenth century "
    "steam-powered presses could print thousands of pages an hour, making reading a part of everyday life for "
    "millions of people who had never owned a book before. Libraries grew, schools spread, and ideas travelled "
    "faster than any army, changing how people thought about religion, science, politics and themselves. Today a "
    "single phone holds more text than the greatest medieval library, and anyone can publish to the whole world in "
    "seconds, which raises new questions about truth, trust and attention that the printers of Mainz never imagined.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water "
    "boils at a lower temperature and food takes longer to cook. A pressure cooker works the other way round: by "
    "sealing the pot, it raises the pressure inside, so the water stays liquid above its usual boiling point and beans "
    "or tough cuts of meat become tender in a fraction of the time. The same physics explains why a kettle sounds "
    "different just before it boils, why clouds form as warm air rises and cools, and why mountaineers carry stoves "
    "that burn hotter fuel. Ice, on the other hand, melts at almost the same temperature whatever the pressure, "
    "which is why a glass of iced water is a reliable way to calibrate a thermometer in a kitchen or a laboratory. "
    "Salt dissolved in water lowers its freezing point, which is why roads are salted before a frost.",
    "User: Can you explain what a hash table is?\nAssistant: A hash table stores key-value pairs in an array. A hash "
    "function turns each key into an index, so looking up, inserting or deleting a value takes constant time on "
    "average. When two keys map to the same index, the table resolves the collision, either by keeping a short list "
    "at each slot or by probing for the next free slot. As the table fills up, collisions become more frequent, so "
    "most implementations grow the array and re-insert every entry once the load factor passes a threshold such as "
    "three quarters. Python's dictionaries and sets, Java's HashMap and the unordered containers of C++ are all hash "
    "tables.\nUser: And when would I use a tree instead?\nAssistant: When you need the keys in order, for example to "
    "find every entry between two dates, or when you want guaranteed logarithmic time rather than good average time.",
    "def merge_sorted(left, right):\n    result = []\n    i = j = 0\n    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n            result.append(left[i])\n            i += 1\n        else:\n"
    "            result.append(right[j])\n            j += 1\n"
    "    result.extend(left[i:])\n    result.extend(right[j:])\n"
    "    return result\n\n\ndef merge_sort(items):\n    if len(items) <= 1:\n        return items\n"
    "    middle = len(items) // 2\n"
    "    return merge_sorted(merge_sort(items[:middle]), merge_sort(items[middle:]))\n\n\n"
    "if __name__ == \"__main__\":\n    print(merge_sort([5, 3, 9, 1, 4, 8, 2, 7, 6]))\n",
    "Plants capture the energy of sunlight through photosynthesis. In the chloroplasts of their leaves, chlorophyll "
    "absorbs red and blue light, and that energy splits water into oxygen, which the plant releases, and hydrogen, "
    "which it combines with carbon dioxide from the air to build sugars. Those sugars feed the plant's growth and, "
    "through the food chain, nearly every animal on land, from caterpillars to elephants. Forests, grasslands and the "
    "tiny algae drifting in the oceans together remove billions of tonnes of carbon dioxide from the atmosphere each "
    "year. When leaves fall and decay, fungi and bacteria break them down and return their nutrients to the soil, "
    "where roots take them up again in spring. Farmers have long used this cycle: rotating crops, planting clover or "
    "beans that fix nitrogen, and ploughing the remains of one harvest back into the ground to feed the next. Modern "
    "agriculture adds fertiliser, irrigation and new varieties of wheat and rice, which is how the world now feeds "
    "eight billion people, though often at a cost to rivers, soils and the insects that pollinate our crops. "
    "Scientists are now studying how to make photosynthesis itself more efficient, since most plants convert only "
    "one or two percent of the sunlight that falls on them into stored chemical energy.",
)
# Verification defaults by the merged checkpoint's dtype (its weights carry one rounding to it). A top-1 flip
# counts against the merge only if the reference prefers its own token by more than the tie margin: rounding
# alone flips exact ties (a demo adapter's fp16 merge of SmolLM2-135M flipped 2 of 1009 tokens whose reference
# logits differed by 3e-4, which failed a plain 99.9% agreement bound on one CPU and passed on another).
# Measured on SmolLM2-135M over DEFAULT_PROMPTS with the demo's adapter: fp16 max |Δlogit| 0.039, flips only
# within 3e-4; bf16 0.33, flips within 0.043; merged onto the wrong base (W0 instead of NF4) 17.0 and 74.6% top-1
# agreement outright, 76.4% up to fp16's tie margin, 84.6% up to bf16's.
_DEFAULT_MAX_DIFF = {torch.float32: 1e-2, torch.float16: 0.5, torch.bfloat16: 2.0}
_DEFAULT_TIE_MARGIN = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}
_DEFAULT_MIN_TOP1 = 0.999


def top1_flips(got: torch.Tensor, want: torch.Tensor, tie_margin: float) -> tuple[int, int]:
    """(all, decisive) positions where `got` picks another top-1 token than `want` (logits, last dim vocab).

    A flip is decisive when `want` scores its own top-1 more than `tie_margin` above the token `got` picked.
    """
    picked, wanted = got.argmax(-1, keepdim=True), want.argmax(-1, keepdim=True)
    gap = want.gather(-1, wanted) - want.gather(-1, picked)
    flipped = picked != wanted
    return int(flipped.sum()), int((flipped & (gap > tie_margin)).sum())


def _reference_model(base_dir: Path, adapter_dir: Path, quant: QuantConfig, base: BaseKind) -> nn.Module:
    """base + adapter through qlora_lite, computing in fp32."""
    if base == "quantized":
        model, _ = load_model(base_dir, quant=quant, lora=None, device="cpu", compute_dtype=torch.float32,
                              with_tokenizer=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        adapter = read_adapter(adapter_dir)
        for experts in {m.rpartition(".")[0] for m in adapter.experts}:
            fused = model.get_submodule(experts)
            replace_module(model, experts, make_experts_layer(
                {p: getattr(fused, p).detach() for p in PROJECTIONS}, fused.act_fn, None, set()))
        for module in [m for m in adapter.modules if m not in adapter.experts]:
            linear = model.get_submodule(module)
            bias = None if linear.bias is None else linear.bias.detach()
            replace_module(model, module, LoRALinear4bit(linear.weight.detach(), bias, adapter_name=None))
    load_adapter(model, adapter_dir)
    return model


def verify_merge(merged_dir: str | Path, base_dir: str | Path, adapter_dir: str | Path,
                 prompts: list[str] | None = None, quant: QuantConfig | None = None,
                 max_abs_logit_diff: float | None = None, min_top1_agreement: float = _DEFAULT_MIN_TOP1,
                 tie_margin: float | None = None, base: BaseKind = "quantized", force: bool = False) -> dict[str, Any]:
    """Compare the merged checkpoint (plain transformers, fp32) with base + adapter (qlora_lite, fp32).

    Prompts default to DEFAULT_PROMPTS (fixed random token ids where the checkpoint has no tokenizer).
    Thresholds default by the merged dtype: max |Δlogit| 1e-2 / 0.5 / 2.0 and tie margin 1e-3 / 0.1 / 0.5 for
    float32 / float16 / bfloat16; top-1 agreement up to ties (flips within the tie margin agree) at least
    `min_top1_agreement`. An honest bf16 merge of SmolLM2-135M agrees on 99.2% of tokens outright and on 100%
    up to ties; a bf16 merge onto the wrong base on 75% and 85%.
    The reference is rebuilt with the quantization recorded beside the adapter (settings.py; `quant`, if
    given, must agree) on a base whose fingerprint matches the recorded one (unless `force`).
    Raises VerificationError past either threshold, or if transformers reports missing/unexpected keys.
    """
    from transformers import AutoModelForCausalLM

    merged_dir, base_dir, adapter_dir = Path(merged_dir), Path(base_dir), Path(adapter_dir)
    settings = read_settings(adapter_dir)
    check_base(settings, base_dir, force)
    quant = quant_for(settings, quant, adapter_dir) or QuantConfig()  # (16-bit runs: base="original")
    saved = json.loads((merged_dir / "config.json").read_text()).get("dtype", "float32")
    merged, info = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise VerificationError(f"{merged_dir} does not load cleanly in transformers: {bad}")
    saved_dtype = dtype_from_name(saved) or torch.float32
    limit = max_abs_logit_diff if max_abs_logit_diff is not None else _DEFAULT_MAX_DIFF[saved_dtype]
    tie_margin = tie_margin if tie_margin is not None else _DEFAULT_TIE_MARGIN[saved_dtype]
    reference = _reference_model(base_dir, adapter_dir, quant, base)
    texts = list(prompts or DEFAULT_PROMPTS)
    if any(merged_dir.glob("tokenizer*.json")) or any(merged_dir.glob("*.model")):
        tokenizer = load_tokenizer(merged_dir)
        batches = [tokenizer(text, return_tensors="pt").input_ids for text in texts]
    else:
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, merged.config.vocab_size, (1, 48), generator=generator) for _ in texts]
    max_diff = total_diff = 0.0
    flips = decisive_flips = positions = 0
    with torch.no_grad():
        for ids in batches:
            got, want = merged.eval()(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
            for logits, which in ((got, f"the merged checkpoint {merged_dir}"), (want, "base + adapter")):
                if not torch.isfinite(logits).all():  # max(0.0, nan) is 0.0: a NaN model would otherwise pass
                    raise VerificationError(f"{which} computes NaN or inf logits ({int((~torch.isfinite(logits)).sum())} "
                                            f"of {logits.numel()}); a base or adapter weight is not finite")
            diff = (got - want).abs()
            max_diff, total_diff = max(max_diff, diff.max().item()), total_diff + diff.mean().item() * ids.numel()
            all_flips, decisive = top1_flips(got, want, tie_margin)
            flips, decisive_flips, positions = flips + all_flips, decisive_flips + decisive, positions + ids.numel()
    result = {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": total_diff / positions,
              "top1_agreement": 1 - flips / positions, "top1_agreement_up_to_ties": 1 - decisive_flips / positions,
              "positions": positions, "merged_dtype": saved, "base": base, "max_abs_logit_diff_limit": limit,
              "tie_margin": tie_margin, "min_top1_agreement": min_top1_agreement}
    if max_diff > limit or result["top1_agreement_up_to_ties"] < min_top1_agreement:
        raise VerificationError(f"{merged_dir}: max |Δlogit| {max_diff:.4g} (limit {limit}), top-1 agreement "
                                f"{result['top1_agreement_up_to_ties']:.4f} up to ties of {tie_margin} "
                                f"({result['top1_agreement']:.4f} outright; minimum {min_top1_agreement}) against "
                                "base + adapter; the merge does not reproduce the adapter model (wrong base or quant "
                                "settings?)")
    return result
