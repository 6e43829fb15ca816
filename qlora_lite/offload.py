"""Long context: checkpointed block inputs in pinned host memory, and the MLP over sequence chunks.

With per-block checkpointing (train.enable_checkpointing) the activations a step keeps are the L block
inputs (batch·seq·hidden each), plus one block's recompute in backward. At 128k tokens the first is
L·1 GiB for an 8B model and the second is dominated by the MLP's token × intermediate tensors. Two
independent options take both off the GPU:

    offload_activations   ActivationOffloader: a `saved_tensors_hooks` pair pushed around each block's
                          checkpoint call only, so the one tensor it sees is the block input the
                          checkpoint saves (everything inside the block goes to the checkpoint's own
                          hooks). pack: copy to pinned host memory on a side stream (the GPU copy is
                          freed once the copy is done: `record_stream`); unpack (backward, last block
                          first): wait for this block's copy back, then start the copy of the block
                          before it, so the transfer hides behind this block's recompute + backward.
    mlp_chunk_tokens      install_tiled_mlp: each decoder block's MLP runs over sequence chunks, each
                          chunk its own (nested, non-reentrant) checkpoint; the block's recompute keeps
                          only the MLP input, and one chunk's intermediates live during its backward.

Why not as is: `torch.autograd.graph.save_on_cpu` offloads every saved tensor (inside the blocks too:
no use with checkpointing), copies synchronously and does not prefetch; torchtune's OffloadActivations
(torchtune/training/_activation_offloading.py) wraps the whole forward and decides by tensor size, so it
also offloads the final norm's and the loss's saved tensors, which backward needs at once. Here only
what the checkpoints save moves. On CPU "host memory" is the same memory: the option makes a host
copy (so the round trip runs and is tested) and transfers nothing.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import TrainingError

__all__ = ["ActivationOffloader", "install_activation_offload", "install_tiled_mlp"]


@dataclass(eq=False)
class _Saved:
    """One offloaded block input: the host copy, and (between prefetch and use) its way back."""

    host: torch.Tensor
    device: torch.device
    previous: weakref.ref | None  # the block input saved before this one: prefetched when this one is used
    on_device: torch.Tensor | None = None
    ready: torch.cuda.Event | None = field(default=None, repr=False)


class ActivationOffloader:
    """saved_tensors_hooks that keep a checkpointed block's input in (pinned) host memory.

    Counters (bytes, since construction): `offloaded_bytes` (device → host), `fetched_bytes` (host →
    device), `host_bytes` (host copies alive now) and `peak_host_bytes`; the planner predicts them.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.offloaded_bytes = self.fetched_bytes = self.host_bytes = self.peak_host_bytes = 0
        self._last: weakref.ref | None = None

    def _release(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def pack(self, tensor: torch.Tensor) -> _Saved | torch.Tensor:
        if tensor.device.type == "cuda":
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its memory is reused only once the copy has read it
            self.offloaded_bytes += host.nbytes
        elif tensor.device.type == "cpu":
            host = tensor.detach().clone()  # the round trip without a transfer: what the CPU tests run
        else:
            return tensor
        saved = _Saved(host, tensor.device, self._last)
        self._last = weakref.ref(saved)
        self.host_bytes += host.nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        weakref.finalize(saved, self._release, host.nbytes)  # the graph dropped it: the host copy is freed
        return saved

    def _fetch(self, saved: _Saved) -> None:
        """Start the copy back to the device on the side stream (into memory of the compute stream)."""
        compute = torch.cuda.current_stream(saved.device)
        target = torch.empty_like(saved.host, device=saved.device)
        self.stream.wait_stream(compute)  # the target's memory is free for the side stream to write
        with torch.cuda.stream(self.stream):
            target.copy_(saved.host, non_blocking=True)
        target.record_stream(self.stream)
        saved.on_device, saved.ready = target, self.stream.record_event()
        self.fetched_bytes += saved.host.nbytes

    def unpack(self, saved: _Saved | torch.Tensor) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        if saved.device.type != "cuda":
            return saved.host
        if saved.on_device is None:  # not prefetched (the last block, or a second backward)
            self._fetch(saved)
        torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        tensor, saved.on_device = saved.on_device, None
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None and previous.on_device is None:
            self._fetch(previous)  # the next block backward reaches, copied while this one computes
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def install_activation_offload(model: nn.Module, device: torch.device | str) -> ActivationOffloader:
    """Route the input of every checkpointed block of `model` through an ActivationOffloader.

    Call after `train.enable_checkpointing`: transformers gives each checkpointed layer a
    `_gradient_checkpointing_func`; the offloader's hooks are pushed around that call only.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and callable(getattr(m, "_gradient_checkpointing_func", None))]
    if not layers:
        raise TrainingError("offload_activations offloads the checkpointed blocks' inputs, and this model has no "
                            "checkpointed block: set gradient_checkpointing: true")
    offloader = ActivationOffloader(device)
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def offloaded(function, *args, _inner=inner, **kwargs):
            with offloader.hooks():
                return _inner(function, *args, **kwargs)

        layer._gradient_checkpointing_func = offloaded
    return offloader


def _tiled_forward(forward, chunk_tokens: int, hidden: torch.Tensor) -> torch.Tensor:
    """`forward` (a position-wise MLP) over chunks of `chunk_tokens` positions along the sequence axis."""
    if hidden.dim() < 2 or hidden.shape[-2] <= chunk_tokens:
        return forward(hidden)
    chunks = hidden.split(chunk_tokens, dim=-2)
    if torch.is_grad_enabled():  # each chunk's intermediates are recomputed in its own backward, not kept
        outputs = [checkpoint(forward, chunk, use_reentrant=False) for chunk in chunks]
    else:
        outputs = [forward(chunk) for chunk in chunks]
    return torch.cat(outputs, dim=-2)


def install_tiled_mlp(model: nn.Module, chunk_tokens: int) -> int:
    """Run every decoder block's `mlp` over sequence chunks of `chunk_tokens`; returns how many.

    The module's forward is replaced on the instance (its parameters and their names stay as they
    are, so adapters save and load unchanged). Dropout inside the MLP (LoRA dropout) draws a mask per
    chunk: a different random draw than the untiled run, the same in recompute.
    """
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise TrainingError(f"mlp_chunk_tokens={chunk_tokens!r} must be a positive integer")
    from .memory_arch import layer_index

    mlps = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "mlp" and layer_index(n) is not None]
    if not mlps:
        raise TrainingError(f"mlp_chunk_tokens: {type(model).__name__} has no decoder blocks with an `mlp` module "
                            "to tile; set mlp_chunk_tokens: 0")
    for mlp in mlps:
        mlp.forward = functools.partial(_tiled_forward, mlp.forward, chunk_tokens)
    return len(mlps)
