"""Mixture-of-experts layers: each expert's matrix a frozen NF4 weight, per-expert LoRA in PEFT's layout.

transformers 5 stores a sparse MLP's experts as two 3-D parameters of one module (Mixtral,
Qwen3-MoE, OLMoE, ...): `gate_up_proj` (experts × 2·intermediate × hidden, the gate rows first)
and `down_proj` (experts × hidden × intermediate), called as `experts(x, top_k_index, top_k_weights)`
by the block after its router. `LoRAExperts4bit` replaces that module:

    per expert e routed at least one token:   W_e = dequantize(NF4_e)   (one NF4Weight per expert
                                              and projection, the format and bytes of a linear's)
        h_e = x_e·W_gu,eᵀ + s·x_e·A_gu,eᵀ·B_gu,eᵀ       a_e = act(gate_e)·up_e       (gate, up: halves of h_e)
        y_e = a_e·W_d,eᵀ + s·a_e·A_d,eᵀ·B_d,eᵀ
    out[token] = Σ_k  top_k_weight · y_e(token)     (the router, a plain frozen weight, is untouched)

Tokens are sorted by expert once per call; an expert no token is routed to is never dequantized
and its LoRA factors get a zero gradient. The LoRA factors are held exactly as PEFT's `ParamWrapper`
(`target_parameters`) holds them, so an adapter file is a rename: for E experts and rank r,
`lora_A` is (E·r, in) with expert e's rows at [e·r, (e+1)·r) and `lora_B` is (out, r·E) with
expert e's columns at e, e+E, e+2E, ... (PEFT reshapes it to (out, r, E)). PEFT's parameter
targets take no dropout, and neither do these.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .layers import AdapterRegistry, AdapterSpec, _dense, _dense_for_matmul
from .nf4 import NF4Weight

__all__ = ["PROJECTIONS", "LoRAExpertProjection4bit", "LoRAExperts4bit", "fused_experts_modules",
           "unsupported_expert_parameters", "expert_delta_weight", "peft_wrapper_path", "projection_from_wrapper",
           "ExpertSource", "expert_source", "model_key", "ExpertAssembler"]

PROJECTIONS = ("gate_up_proj", "down_proj")  # transformers 5's fused expert parameters, in registration order


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers' experts module as this file replaces it: exactly 3-D `gate_up_proj` and `down_proj`,
    stored (experts, out, in) (no `is_transposed` layout, no expert biases)."""
    if isinstance(module, LoRAExperts4bit):
        return True
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == set(PROJECTIONS) and all(p.dim() == 3 for p in params.values())
            and not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
            and params["gate_up_proj"].shape[1] == 2 * params["down_proj"].shape[2])


def fused_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every experts module `LoRAExperts4bit` handles (or already is), by path, in model order."""
    return {name: m for name, m in model.named_modules() if _is_fused_experts(m)}


def unsupported_expert_parameters(model: nn.Module) -> list[str]:
    """Parameters of 3 or more dimensions outside a handled experts module: expert layouts (biases,
    transposed storage) that would otherwise stay 16-bit and untrained without anyone being told."""
    handled = fused_experts_modules(model)
    return [n for n, p in model.named_parameters() if p.dim() >= 3 and n.rpartition(".")[0] not in handled]


def expert_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, experts: int, scaling: float) -> torch.Tensor:
    """s·B_e·A_e for every expert from PEFT-layout factors (A: (E·r, in), B: (out, r·E)), (E, out, in) fp32."""
    a = lora_A.float().view(experts, -1, lora_A.shape[1])
    b = lora_B.float().view(lora_B.shape[0], -1, experts)
    return scaling * torch.einsum("ore,eri->eoi", b, a)


class _GroupedLoRAMatmul(torch.autograd.Function):
    """y[rows of e] = x[rows of e]·W_eᵀ (+ s·x·A_eᵀ·B_eᵀ) for tokens grouped by expert (`counts` rows each).

    As `layers._LoRABaseMatmul`, per expert: W_e is dequantized for the forward and again for grad_x,
    never kept; forward saves x and the r-wide x·A_eᵀ; the factor gradients are written into one
    full-size tensor each (zero for an expert with no rows) instead of one per expert.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, counts, bases, scaling):
        n_out = bases[0].shape[0]
        y = x.new_empty(x.shape[0], n_out)
        ctx.counts, ctx.bases, ctx.scaling, ctx.has_lora = counts, bases, scaling, lora_A is not None
        if ctx.has_lora:
            experts = len(counts)
            a = lora_A.to(x.dtype).view(experts, -1, x.shape[1])  # (E, r, in)
            b = lora_B.to(x.dtype).view(n_out, -1, experts)  # (out, r, E)
            xa = x.new_empty(x.shape[0], a.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(x[rows], _dense_for_matmul(bases[e], x.dtype).t(), out=y[rows])
                if ctx.has_lora:
                    torch.mm(x[rows], a[e].t(), out=xa[rows])
                    y[rows].addmm_(xa[rows], b[:, :, e].t(), alpha=scaling)
            start += n
        if ctx.has_lora:
            ctx.lora_dtypes = lora_A.dtype, lora_B.dtype
            ctx.save_for_backward(x, xa, a, b)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        counts, s = ctx.counts, ctx.scaling
        grad_x = grad_A = grad_B = None
        if ctx.has_lora:
            x, xa, a, b = ctx.saved_tensors
            grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.new_empty(grad_y.shape[0], ctx.bases[0].shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows, g = slice(start, start + n), grad_y[start:start + n]
                if ctx.has_lora:
                    gb = g @ b[:, :, e]  # (n, r)
                if grad_x is not None:
                    torch.mm(g, _dense_for_matmul(ctx.bases[e], grad_y.dtype), out=grad_x[rows])
                    if ctx.has_lora:
                        grad_x[rows].addmm_(gb, a[e], alpha=s)
                if ctx.has_lora:
                    grad_a[e] = torch.addmm(a[e], gb.t(), x[rows], beta=0, alpha=s)
                    grad_b[:, :, e] = torch.addmm(b[:, :, e], g.t(), xa[rows], beta=0, alpha=s)
            start += n
        if ctx.has_lora:
            if ctx.needs_input_grad[1]:
                grad_A = grad_a.view(-1, grad_a.shape[-1]).to(ctx.lora_dtypes[0])
            if ctx.needs_input_grad[2]:
                grad_B = grad_b.view(grad_b.shape[0], -1).to(ctx.lora_dtypes[1])
        return grad_x, grad_A, grad_B, None, None, None


class LoRAExpertProjection4bit(AdapterRegistry):
    """One fused projection of every expert: frozen bases (one NF4Weight per expert, or a frozen 3-D
    16-bit parameter for a LoRA control run) and named adapters in PEFT's `ParamWrapper` layout."""

    def __init__(self, weight: torch.Tensor | list[NF4Weight]):
        super().__init__()
        if isinstance(weight, torch.Tensor):
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
            self.num_experts, self.out_features, self.in_features = weight.shape
        else:
            self.weight = nn.ModuleList(weight)
            self.num_experts, (self.out_features, self.in_features) = len(weight), tuple(weight[0].shape)
        self._init_adapters()  # no LoftQ/PiSSA base on experts: own_base stays False

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, nn.ModuleList)

    @property
    def device(self) -> torch.device:
        return self.weight[0].device if self.quantized else self.weight.device

    def bases(self) -> list[NF4Weight | torch.Tensor]:
        return list(self.weight) if self.quantized else list(self.weight.unbind(0))

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every expert's W0 in `dtype`, (experts, out, in): what the projection computes with."""
        return torch.stack([_dense(w, dtype) for w in self.bases()])

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: str = "kaiming", dtype: torch.dtype = torch.float32,
                    activate: bool = True, use_dora: bool = False) -> None:
        """`LoRALinear4bit.add_adapter`'s signature. PEFT's initialisation: kaiming-uniform over the whole
        (E·r, in) A (fan-in = in), B = 0; "zeros" for factors about to be overwritten (a loaded adapter).
        No dropout and no DoRA: PEFT's parameter targets have neither."""
        if lora_dropout or use_dora:
            raise ValueError(f"expert adapters take no {'dropout' if lora_dropout else 'DoRA'} (as PEFT's "
                             "target_parameters); set lora_dropout: 0 and use_dora: false")
        if r <= 0 or r > min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} must be in [1, min(in, out) = {min(self.in_features, self.out_features)}]")
        lora_A = torch.zeros(self.num_experts * r, self.in_features, dtype=dtype, device=self.device)
        if init_lora_weights == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
        elif init_lora_weights != "zeros":
            raise ValueError(f"init_lora_weights={init_lora_weights!r}: expert adapters start 'kaiming', "
                             "'gaussian' or 'zeros'")
        self.lora_A[name] = nn.Parameter(lora_A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r * self.num_experts, dtype=dtype,
                                                     device=self.device))
        self.adapters[name] = AdapterSpec(r, float(lora_alpha), 0.0, use_rslora)
        if activate:
            self.set_adapter(name)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: rows grouped by expert, `counts[e]` rows for expert e."""
        name = self.current_adapter
        if name is None:
            return _GroupedLoRAMatmul.apply(x, None, None, counts, self.bases(), 0.0)
        return _GroupedLoRAMatmul.apply(x, self.lora_A[name], self.lora_B[name], counts, self.bases(),
                                        self.adapters[name].scaling)

    def magnitude(self, name: str | None = None) -> None:
        """No DoRA on experts (`LoRALinear4bit.magnitude`'s interface)."""
        return None

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """s·B_e·A_e for every expert, (experts, out, in), fp32: PEFT's `get_delta_weight`."""
        name = name or self.active_adapter
        return expert_delta_weight(self.lora_A[name], self.lora_B[name], self.num_experts, self.adapters[name].scaling)

    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """dequantize(W0_e) + s·B_e·A_e for every expert, (experts, out, in), fp32."""
        return self.base_weight(torch.float32) + self.delta_weight(name)

    def extra_repr(self) -> str:
        spec = self.adapters.get(self.active_adapter) if self.active_adapter else None
        lora = f"r={spec.r}, alpha={spec.lora_alpha}" if spec else "no adapter"
        kind = "NF4" if self.quantized else str(self.weight.dtype).removeprefix("torch.")
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, base={kind}, {lora}, "
                f"active={self.active_adapter!r}")


class LoRAExperts4bit(nn.Module):
    """Drop-in for transformers' fused experts module: `forward(hidden_states, top_k_index, top_k_weights)`."""

    def __init__(self, gate_up_proj: LoRAExpertProjection4bit, down_proj: LoRAExpertProjection4bit,
                 act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.num_experts = gate_up_proj.num_experts

    def projections(self) -> dict[str, LoRAExpertProjection4bit]:
        return {"gate_up_proj": self.gate_up_proj, "down_proj": self.down_proj}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        with torch.no_grad():
            order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, token order kept
            back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            counts = torch.bincount(flat, minlength=self.num_experts)[:self.num_experts].tolist()
        x = hidden_states[order // k]
        gate, up = self.gate_up_proj(x, counts).chunk(2, dim=-1)
        y = self.down_proj(self.act_fn(gate) * up, counts)[back].view(tokens, k, -1)  # back in (token, slot) order
        # a sum over the k slots, not an index_add_ (whose backward would keep another copy of y); the
        # router's fp32 weights (Mixtral) promote the product, as in transformers
        return (y * top_k_weights.unsqueeze(-1)).sum(1).to(hidden_states.dtype)


def peft_wrapper_path(experts: str, projection: str, adapted: list[str]) -> str:
    """Where PEFT keeps the factors of `experts`.`projection` when `adapted` of the module's projections
    carry the adapter: it nests one `ParamWrapper` per targeted parameter, the first registered innermost,
    so gate_up_proj's are under "<experts>.base_layer" when down_proj is adapted too."""
    order = [p for p in PROJECTIONS if p in adapted]
    return experts + ".base_layer" * (len(order) - 1 - order.index(projection))


def projection_from_wrapper(path: str, adapted: list[str]) -> tuple[str, str]:
    """(experts module, projection) for a PEFT wrapper path: the inverse of `peft_wrapper_path`."""
    depth = 0
    while path.endswith(".base_layer"):
        path, depth = path.removesuffix(".base_layer"), depth + 1
    order = [p for p in PROJECTIONS if p in adapted]
    if depth >= len(order):
        raise ValueError(f"{path}: {depth} nested base_layer levels but only {order} are targeted")
    return path, order[len(order) - 1 - depth]


# ---- checkpoints: per-expert tensors ----------------------------------------------------------------
# Hub checkpoints (and transformers 5's save_pretrained) keep one 2-D tensor per expert and projection,
# the layout transformers' conversion mapping fuses at load: Mixtral's block_sparse_moe.experts.<e>.w1/w3/w2
# (gate, up, down), Qwen-MoE's mlp.experts.<e>.gate_proj/up_proj/down_proj; gate_up_proj[e] = cat(gate, up).
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\."
                         r"(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<experts>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_PARTS = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
          "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", None), "down_proj": ("down_proj", None)}


class ExpertSource(tuple):
    """(experts module path, projection, expert index or None for a fused 3-D tensor, part: 0 gate rows,
    1 up rows, None the whole matrix) of one checkpoint tensor."""

    experts = property(lambda self: self[0])
    projection = property(lambda self: self[1])
    expert = property(lambda self: self[2])
    part = property(lambda self: self[3])


def expert_source(key: str) -> ExpertSource | None:
    """Where a checkpoint tensor goes in the fused experts, or None for any other tensor."""
    if (match := _PER_EXPERT.match(key)) is not None:
        projection, part = _PARTS[match["name"]]
        return ExpertSource((f"{match['block']}.mlp.experts", projection, int(match["expert"]), part))
    if (match := _FUSED.match(key)) is not None:
        return ExpertSource((match["experts"], match["proj"], None, None))
    return None


def model_key(key: str) -> str:
    """The model's name for a checkpoint key outside the experts (Mixtral's router: block_sparse_moe -> mlp)."""
    return key.replace(".block_sparse_moe.", ".mlp.")


class ExpertAssembler:
    """Collects per-expert checkpoint tensors into each expert's matrix (gate and up arrive as two
    tensors) and hands each on as soon as it is complete, so a loader holds at most the halves
    still waiting for their other half."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, int], list[torch.Tensor | None]] = {}

    def add(self, source: ExpertSource, tensor: torch.Tensor) -> list[tuple[str, str, int, torch.Tensor]]:
        """The (experts, projection, expert, matrix) completed by `tensor`."""
        if source.expert is None:
            return [(source.experts, source.projection, e, tensor[e]) for e in range(tensor.shape[0])]
        if source.part is None:
            return [(source.experts, source.projection, source.expert, tensor)]
        halves = self.waiting.setdefault((source.experts, source.expert), [None, None])
        halves[source.part] = tensor
        if any(h is None for h in halves):
            return []
        del self.waiting[(source.experts, source.expert)]
        return [(source.experts, "gate_up_proj", source.expert, torch.cat(halves))]
