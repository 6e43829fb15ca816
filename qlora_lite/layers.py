"""`LoRALinear4bit`: a frozen NF4 linear plus trainable low-rank adapters (LoRA or DoRA).

    y = x·W0ᵀ + b + s·dropout(x)·Aᵀ·Bᵀ          W0 = dequantize(NF4)  (never stored in 16 bit)

    DoRA (use_dora): a trainable magnitude m per output row rescales the adapted weight,
    W = m · (W0 + s·B·A) / ‖W0 + s·B·A‖ (row norm over the input dimension, treated as a constant
    in backward as the DoRA paper and PEFT do), so  y = (m/‖·‖)·(x·W0ᵀ + s·x·Aᵀ·Bᵀ) + b.

The base matmul and the LoRA branch run in one autograd function. Forward saves only what the
LoRA gradients need (the LoRA input and the r-wide product x·Aᵀ); backward dequantizes W0 again
for grad_x. W0 receives no gradient. Several named adapters can live on one layer; exactly
one is active (or none, when adapters are disabled).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .nf4 import NF4Weight

__all__ = ["lora_scaling", "AdapterRegistry", "LoRALinear4bit", "AdapterSpec", "DEFAULT_ADAPTER", "dora_merge",
           "release_dequantize_buffers"]

DEFAULT_ADAPTER = "default"


def _dense(base: NF4Weight | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 in `dtype`: dequantized from NF4, or the plain frozen weight of a 16-bit control run."""
    return base.dequantize(dtype) if isinstance(base, NF4Weight) else base.to(dtype)


class _DequantizeBuffers(threading.local):
    """One flat buffer per dtype and thread (CPU autograd runs backward on the thread that called it)."""

    def __init__(self) -> None:
        self.by_dtype: dict[torch.dtype, torch.Tensor] = {}


_CPU_BUFFERS = _DequantizeBuffers()


def release_dequantize_buffers() -> None:
    """Free this thread's CPU dequantize buffers (`_dense_for_matmul`); the next matmul makes a new one."""
    _CPU_BUFFERS.by_dtype.clear()


def _dense_for_matmul(base: NF4Weight | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 in `dtype` for one matmul that keeps no reference to it (the hot path: forward, recompute, backward).

    On CPU the NF4 weight is dequantized into a buffer this thread reuses, the largest weight's size:
    a fresh tensor of tens of MB is memory the OS hands over page by page on every call (a 5632x2048
    fp32 weight: 40 ms through bitsandbytes into fresh memory, 12 ms into warm memory; 2-3x more than
    the dequantize itself). On a GPU the caching allocator already reuses blocks; under torch.compile
    the graph owns its memory.
    """
    if not isinstance(base, NF4Weight) or base.device.type != "cpu" or torch.compiler.is_compiling():
        return _dense(base, dtype)
    n = base.shape.numel()
    buffer = _CPU_BUFFERS.by_dtype.get(dtype)
    if buffer is None or buffer.numel() < n:
        buffer = _CPU_BUFFERS.by_dtype[dtype] = torch.empty(n, dtype=dtype)
    return base.dequantize(dtype, out=buffer[:n].view(base.shape))


def _hand_packed_bytes_to_storage(layer: LoRALinear4bit, state_dict: dict, prefix: str, *_) -> None:
    """bitsandbytes keeps the packed bytes under the layer's own `weight` key, which PyTorch's load
    gives to the layer; pass them on to the NF4 storage module registered under that name."""
    key = prefix + "weight"
    if layer.quantized and key in state_dict:
        state_dict[key + ".packed"] = state_dict.pop(key)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s in y = W0·x + s·B·A·x: α/r, or α/√r with rsLoRA (the one copy of this rule)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)


def dora_merge(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor:
    """W0 + ΔW, and for DoRA (a magnitude given) that rescaled so row i has norm m_i: the merged weight (fp32)."""
    w = w0.float() + delta
    if magnitude is not None:
        w.mul_((magnitude.float() / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1))
    return w


class _LoRABaseMatmul(torch.autograd.Function):
    """y = x·W0ᵀ + b (+ s·x_lora·Aᵀ·Bᵀ). Saves x_lora and x_lora·Aᵀ, never a dense W0.

    The scaling s is applied to the r-wide factors, never to a full activation, and the LoRA
    terms are accumulated into the base results in place (addmm), so the adapter adds two thin
    matmuls per pass and no full-size temporaries.
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, bias, base, scaling):
        weight = _dense_for_matmul(base, x.dtype)
        y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        del weight
        ctx.base, ctx.scaling, ctx.has_lora = base, scaling, lora_A is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.lora_input_is_input = x_lora is x
        if ctx.has_lora:
            a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)  # no copy when the adapters are in the compute dtype
            xa = x_lora @ a.t()  # (..., r)
            y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), b.t(), alpha=scaling)
            ctx.lora_dtypes = lora_A.dtype, lora_B.dtype
            ctx.save_for_backward(x_lora, xa, a, b)  # the compute-dtype copies: backward casts nothing back
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_x_lora = grad_A = grad_B = grad_bias = None
        s = ctx.scaling
        flat_g = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.has_lora:
            x_lora, xa, a, b = ctx.saved_tensors
            gb = flat_g @ b.to(grad_y.dtype)  # (tokens, r)
            a = a.to(grad_y.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _dense_for_matmul(ctx.base, grad_y.dtype)
            if ctx.has_lora and ctx.lora_input_is_input and ctx.needs_input_grad[1]:
                grad_x.view(-1, grad_x.shape[-1]).addmm_(gb, a, alpha=s)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = flat_g.sum(0).to(ctx.bias_dtype)
        if ctx.has_lora:
            # s rides in the GEMM's alpha (beta=0: the 0-d input is never read), not in a separate multiply
            if ctx.needs_input_grad[1] and not ctx.lora_input_is_input:
                grad_x_lora = _scaled_mm(gb, a, s).view(x_lora.shape)
            if ctx.needs_input_grad[2]:
                grad_A = _scaled_mm(gb.t(), x_lora.reshape(-1, x_lora.shape[-1]), s).to(ctx.lora_dtypes[0])
            if ctx.needs_input_grad[3]:
                grad_B = _scaled_mm(flat_g.t(), xa.reshape(-1, xa.shape[-1]), s).to(ctx.lora_dtypes[1])
        return grad_x, grad_x_lora, grad_A, grad_B, grad_bias, None, None


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·(m1 @ m2) in one GEMM."""
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=scale)


class AdapterRegistry(nn.Module):
    """Named adapters on one frozen base, exactly one active (or none, or all disabled for a block).

    The registry both LoRA layer kinds share (`LoRALinear4bit`, and `experts.LoRAExpertProjection4bit`):
    a subclass fills `lora_A`, `lora_B` and `adapters` in its `add_adapter` and deletes any extra
    per-adapter entries in `_drop_adapter_extras`. `_init_adapters` runs after the base is registered
    (parameter order: base first, as PEFT's layers).
    """

    def _init_adapters(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.own_base = False  # True: the base is a LoftQ/PiSSA one, not NF4(W0); saved beside the adapter
        self._disabled = False

    def set_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        del self.lora_A[name], self.lora_B[name], self.adapters[name]
        self._drop_adapter_extras(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def _drop_adapter_extras(self, name: str) -> None:
        """Delete what else the subclass keeps per adapter (dropout, DoRA magnitude)."""

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the layer computes the base alone."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @property
    def current_adapter(self) -> str | None:
        """The adapter forward applies: the active one, or None while disabled."""
        return None if self._disabled else self.active_adapter

    @property
    def scaling(self) -> float:
        return self.adapters[self.active_adapter].scaling


class LoRALinear4bit(AdapterRegistry):
    """A linear layer with a frozen base `weight` and named LoRA adapters.

    `weight` is an `NF4Weight` (a module whose bytes and scales are registered frozen tensors;
    its state dict is bitsandbytes' `weight`, `weight.absmax`, ...) or, for a 16-bit LoRA control
    run, a plain frozen `nn.Parameter` as in `nn.Linear`. Both move with `.to(device)` and are
    visited by `parameters()`, `state_dict()` and FSDP like any other tensor of the model; a dtype
    cast (`.half()`) re-casts a plain weight and leaves the NF4 bytes and scales alone.
    """

    def __init__(self, base: NF4Weight | torch.Tensor, bias: torch.Tensor | None = None, r: int = 16,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: str = "kaiming", lora_dtype: torch.dtype = torch.float32,
                 adapter_name: str | None = DEFAULT_ADAPTER, use_dora: bool = False):
        super().__init__()
        self.weight = base if isinstance(base, NF4Weight) else nn.Parameter(base.detach(), requires_grad=False)
        self.out_features, self.in_features = base.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._init_adapters()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only (PEFT's name)
        if adapter_name is not None:  # None: a frozen quantized linear that carries no adapter
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype,
                             use_dora=use_dora)
        self.register_load_state_dict_pre_hook(_hand_packed_bytes_to_storage)

    @property
    def quantized(self) -> bool:
        """Whether the base is stored NF4 (else a plain 16/32-bit weight)."""
        return isinstance(self.weight, NF4Weight)

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W0 in `dtype`: what the layer computes with (dequantized where it is NF4)."""
        return _dense(self.weight, dtype)

    # ---- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: str = "kaiming",
                    dtype: torch.dtype = torch.float32, activate: bool = True, use_dora: bool = False) -> None:
        """`init_lora_weights`: "kaiming" (PEFT's default) or "gaussian" A with B = 0, or "zeros" (both 0:
        the factors are about to be overwritten, by a loaded adapter or a LoftQ/PiSSA initialisation).
        DoRA's magnitude starts as the row norms of W0 + s·B·A (`reset_magnitude` after changing them)."""
        if r <= 0 or r > min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} must be in [1, min(in, out) = {min(self.in_features, self.out_features)}]")
        device = self.weight.device
        lora_A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
        elif init_lora_weights == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # PEFT's default, as nn.Linear's
        elif init_lora_weights == "zeros":
            lora_A.zero_()
        else:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} must be 'kaiming', 'gaussian' or 'zeros'")
        self.lora_A[name] = nn.Parameter(lora_A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        # A module added later starts in training mode; follow the layer's mode (an adapter loaded
        # into an eval-mode model must not apply dropout).
        self.lora_dropout[name] = (nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()).train(self.training)
        self.adapters[name] = AdapterSpec(r, float(lora_alpha), float(lora_dropout), use_rslora, use_dora)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
            self.reset_magnitude(name)
        if activate:
            self.set_adapter(name)

    def _drop_adapter_extras(self, name: str) -> None:
        del self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def reset_magnitude(self, name: str) -> None:
        """m = ‖W0 + s·B·A‖ per output row (fp32), as PEFT's DoRA initialises it: the layer then computes
        exactly W0 + s·B·A until m trains."""
        with torch.no_grad():
            self.lora_magnitude_vector[name].copy_(self.weight_norm(name))

    def weight_norm(self, name: str | None = None) -> torch.Tensor:
        """‖W0 + s·B·A‖ over the input dimension, one per output row, in fp32 and without gradient."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base_weight(torch.float32) + self.delta_weight(name), dim=1)

    # ---- compute -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.current_adapter
        if name is None:
            return _LoRABaseMatmul.apply(x, x, None, None, self.bias, self.weight, 0.0)
        x_lora = self.lora_dropout[name](x)
        if self.adapters[name].use_dora:
            return self._dora_forward(x, x_lora, name)
        return _LoRABaseMatmul.apply(x, x_lora, self.lora_A[name], self.lora_B[name], self.bias, self.weight,
                                     self.adapters[name].scaling)

    def _dora_forward(self, x: torch.Tensor, x_lora: torch.Tensor, name: str) -> torch.Tensor:
        """y = b + x·W0ᵀ + (m/‖W0 + s·B·A‖ - 1)·x_lora·W0ᵀ + (m/‖·‖)·s·x_lora·Aᵀ·Bᵀ, PEFT's DoRA arithmetic.

        Without dropout (x_lora is x) that is (m/‖·‖)·(x·W0ᵀ + s·x·Aᵀ·Bᵀ) + b: one base matmul. The norm
        is a constant for autograd (detached); m and the factors get their gradients through torch ops,
        the base matmul still never keeps a dense W0.
        """
        spec, a, b = self.adapters[name], self.lora_A[name], self.lora_B[name]
        scale = (self.lora_magnitude_vector[name].to(x.dtype) / self.weight_norm(name).to(x.dtype))
        lora = (x_lora @ a.to(x.dtype).t()) @ (spec.scaling * b.to(x.dtype)).t()
        base = _LoRABaseMatmul.apply(x_lora, x_lora, None, None, None, self.weight, 0.0)
        y = scale * (base + lora)
        if x_lora is not x:  # dropout active: the unscaled base term sees the undropped input, as in PEFT
            y = y + _LoRABaseMatmul.apply(x, x, None, None, None, self.weight, 0.0) - base
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def magnitude(self, name: str | None = None) -> torch.Tensor | None:
        """DoRA's m (fp32) for the adapter, or None for a plain LoRA adapter."""
        name = name or self.active_adapter
        return self.lora_magnitude_vector[name].float() if self.adapters[name].use_dora else None

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """s·B·A in fp32."""
        name = name or self.active_adapter
        return self.adapters[name].scaling * (self.lora_B[name].float() @ self.lora_A[name].float())

    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """dequantize(W0) + s·B·A (DoRA: rescaled row by row to m), in fp32: the weight the forward computes with."""
        return dora_merge(self.base_weight(torch.float32), self.delta_weight(name), self.magnitude(name))

    def extra_repr(self) -> str:
        kind = "NF4" if self.quantized else str(self.weight.dtype).removeprefix("torch.")
        spec = self.adapters.get(self.active_adapter) if self.active_adapter else None
        lora = f"r={spec.r}, alpha={spec.lora_alpha}{', dora' if spec.use_dora else ''}" if spec else "no adapter"
        return f"in={self.in_features}, out={self.out_features}, base={kind}, {lora}, active={self.active_adapter!r}"
