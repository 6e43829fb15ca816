"""`LoRALinear4bit`: a frozen NF4 linear plus trainable low-rank adapters.

    y = x·W0ᵀ + b + s·dropout(x)·Aᵀ·Bᵀ          W0 = dequantize(NF4)  (never stored in 16 bit)

The base matmul and the LoRA branch run in one autograd function. Forward saves only what the
LoRA gradients need (the LoRA input and the r-wide product x·Aᵀ); backward dequantizes W0 again
for grad_x. W0 receives no gradient. Several named adapters can live on one layer; exactly
one is active (or none, when adapters are disabled).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .nf4 import NF4Weight

__all__ = ["LoRALinear4bit", "DenseWeight", "AdapterSpec", "DEFAULT_ADAPTER"]

DEFAULT_ADAPTER = "default"


class DenseWeight:
    """A frozen 16/32-bit weight with the `NF4Weight` interface, for plain-LoRA control runs."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight if dtype is None else self.weight.to(dtype)

    def to(self, device: torch.device | str) -> DenseWeight:
        return DenseWeight(self.weight.to(device))

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        return {prefix: self.weight}


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class _LoRABaseMatmul(torch.autograd.Function):
    """y = x·W0ᵀ + b (+ s·x_lora·Aᵀ·Bᵀ). Saves x_lora and x_lora·Aᵀ, never a dense W0.

    The scaling s is applied to the r-wide factors, never to a full activation, and the LoRA
    terms are accumulated into the base results in place (addmm), so the adapter adds two thin
    matmuls per pass and no full-size temporaries.
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, bias, base, scaling):
        weight = base.dequantize(x.dtype)
        y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        del weight
        ctx.base, ctx.scaling, ctx.has_lora = base, scaling, lora_A is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.lora_input_is_input = x_lora is x
        if ctx.has_lora:
            a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
            xa = x_lora @ a.t()  # (..., r)
            y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), (scaling * b).t())
            ctx.save_for_backward(x_lora, xa, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_x_lora = grad_A = grad_B = grad_bias = None
        s = ctx.scaling
        flat_g = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.has_lora:
            x_lora, xa, lora_A, lora_B = ctx.saved_tensors
            gb = flat_g @ lora_B.to(grad_y.dtype)  # (tokens, r)
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ ctx.base.dequantize(grad_y.dtype)
            if ctx.has_lora and ctx.lora_input_is_input and ctx.needs_input_grad[1]:
                grad_x.view(-1, grad_x.shape[-1]).addmm_(gb, s * lora_A.to(grad_y.dtype))
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = flat_g.sum(0).to(ctx.bias_dtype)
        if ctx.has_lora:
            if ctx.needs_input_grad[1] and not ctx.lora_input_is_input:
                grad_x_lora = (gb @ (s * lora_A.to(grad_y.dtype))).view(x_lora.shape)
            if ctx.needs_input_grad[2]:
                grad_A = ((s * gb).t() @ x_lora.reshape(-1, x_lora.shape[-1])).to(lora_A.dtype)
            if ctx.needs_input_grad[3]:
                grad_B = (flat_g.t() @ (s * xa.reshape(-1, xa.shape[-1]))).to(lora_B.dtype)
        return grad_x, grad_x_lora, grad_A, grad_B, grad_bias, None, None


class LoRALinear4bit(nn.Module):
    """A linear layer with a frozen NF4 base (or a `DenseWeight`, for 16-bit LoRA) and named adapters.

    `.to(device)` moves the base's bytes; dtype conversions (`.half()`, `.to(bf16)`) apply to the
    LoRA parameters and bias only — the quantized base is never re-cast or re-quantized.
    """

    def __init__(self, base: NF4Weight | DenseWeight, bias: torch.Tensor | None = None, r: int = 16,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: str = "kaiming", lora_dtype: torch.dtype = torch.float32,
                 adapter_name: str | None = DEFAULT_ADAPTER):
        super().__init__()
        if isinstance(base, torch.Tensor):
            base = DenseWeight(base)
        self.base = base
        self.out_features, self.in_features = base.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self._disabled = False
        if adapter_name is not None:  # None: a frozen quantized linear that carries no adapter
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype)

    # ---- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: str = "kaiming",
                    dtype: torch.dtype = torch.float32, activate: bool = True) -> None:
        if r <= 0 or r > min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} must be in [1, min(in, out) = {min(self.in_features, self.out_features)}]")
        device = self.base.device
        lora_A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
        elif init_lora_weights == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # PEFT's default, as nn.Linear's
        else:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} must be 'kaiming' or 'gaussian'")
        self.lora_A[name] = nn.Parameter(lora_A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        # A module added later starts in training mode; follow the layer's mode (an adapter loaded
        # into an eval-mode model must not apply dropout).
        self.lora_dropout[name] = (nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()).train(self.training)
        self.adapters[name] = AdapterSpec(r, float(lora_alpha), float(lora_dropout), use_rslora)
        if activate:
            self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the layer computes the base alone: x·W0ᵀ + b."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @property
    def scaling(self) -> float:
        return self.adapters[self.active_adapter].scaling

    # ---- compute -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = None if self._disabled else self.active_adapter
        if name is None:
            return _LoRABaseMatmul.apply(x, x, None, None, self.bias, self.base, 0.0)
        x_lora = self.lora_dropout[name](x)
        return _LoRABaseMatmul.apply(x, x_lora, self.lora_A[name], self.lora_B[name], self.bias, self.base,
                                     self.adapters[name].scaling)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """s·B·A in fp32."""
        name = name or self.active_adapter
        return self.adapters[name].scaling * (self.lora_B[name].float() @ self.lora_A[name].float())

    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """dequantize(W0) + s·B·A, in fp32: exactly the weight the adapter forward computes with."""
        return self.base.dequantize(torch.float32) + self.delta_weight(name)

    # ---- module plumbing --------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Learn the target device from a probe; the base keeps its dtype and bytes.
        probe = fn(torch.empty(0, device=self.base.device))
        if probe.device != self.base.device:
            self.base = self.base.to(probe.device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not isinstance(self.base, nn.Module):  # FSDP storage (fsdp.NF4Parameters) saves itself
            destination.update(self.base.state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The base is frozen and loaded by load.py; here we only accept (and ignore) its keys.
        base_keys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        saved = {k: state_dict.pop(k) for k in base_keys}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            state_dict.update(saved)

    def extra_repr(self) -> str:
        kind = type(self.base).__name__
        spec = self.adapters.get(self.active_adapter) if self.active_adapter else None
        lora = f"r={spec.r}, alpha={spec.lora_alpha}" if spec else "no adapter"
        return f"in={self.in_features}, out={self.out_features}, base={kind}, {lora}, active={self.active_adapter!r}"
