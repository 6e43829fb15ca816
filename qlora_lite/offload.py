"""Host memory doing what the card cannot: checkpointed block inputs and the NF4 base in pinned host
memory, and the MLP over sequence chunks.

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

Big models, `offload_base` (BaseOffloader): every decoder layer's NF4 tensors in one page-locked host
buffer, copied to the GPU before the layer's forward and again before its backward recompute, one layer
ahead on a side stream, released after use; why hooks and not FSDP2's CPUOffloadPolicy: docs/design.md.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import TrainingError

__all__ = ["ActivationOffloader", "install_activation_offload", "install_tiled_mlp", "BaseOffloader",
           "install_base_offload"]


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


# ---- the NF4 base in host memory (offload_base) -----------------------------------------------------------


@dataclass(eq=False)
class _LayerBase:
    """One decoder layer's NF4 tensors: where they are registered, their host copy, their device copy."""

    slots: list[tuple[nn.Module, str, bool]]  # (NF4Weight, registered name, is a parameter), in `_layout` order
    host: torch.Tensor  # one flat uint8 buffer on the host (pinned under CUDA) the slots are views of
    host_views: list[torch.Tensor]
    on_device: torch.Tensor | None = None  # the flat device copy while fetched
    ready: torch.cuda.Event | None = field(default=None, repr=False)


def _layout(like: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of `like` packed one after another in one buffer, each aligned to its element size,
    and the buffer's size. The caller orders them so that real shapes need no padding (the packed codes
    first: their starts stay 16-byte aligned for the dequantize kernels' vector loads)."""
    offsets, end = [], 0
    for tensor in like:
        end = -(-end // tensor.element_size()) * tensor.element_size()
        offsets.append(end)
        end += tensor.nbytes
    return offsets, end


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`like`'s shapes and dtypes as views of the flat uint8 `flat`, laid out by `_layout`."""
    offsets, _ = _layout(like)
    return [flat[start:start + t.nbytes].view(t.dtype).view(t.shape) for start, t in zip(offsets, like)]


def _pin(flat: torch.Tensor) -> None:
    """Page-lock `flat` where it is (cudaHostRegister), for asynchronous copies at full link speed.

    Not `pin_memory()`: torch's caching host allocator rounds every pinned block up to a power of two
    (a 70B layer's 0.43 GiB would take 0.5 GiB); registering the plain allocation pins exactly its bytes.
    """
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(flat.data_ptr(), flat.nbytes, 0)) != 0:
        raise TrainingError(f"offload_base could not pin {flat.nbytes:,} bytes of host memory (cudaHostRegister); "
                            "raise the locked-memory limit (ulimit -l) or free host memory")
    weakref.finalize(flat, cudart.cudaHostUnregister, flat.data_ptr())


class BaseOffloader:
    """The NF4 base of every decoder layer in host memory, on the device only while that layer computes.

    Each layer's NF4 tensors (packed bytes, block scales) are views of one host buffer; the registered
    tensors point at those host views except while the layer runs, when they point at views of one device
    copy (one transfer per layer). Forward: a layer's pre-hook waits for its copy and starts the next
    layer's; its post-hook points the tensors back at the host. Backward (checkpointing recomputes each
    block): the recompute of layer i releases layer i+1, waits for layer i and starts layer i-1; the last
    layer used is released when backward ends. So at most 2 layers' base are on the device.

    Counters (bytes since construction): `fetched_bytes` (host → device copies), `resident_bytes` (device
    copies alive now), `peak_resident_bytes`, `host_bytes` (the whole offloaded base). On CPU the "device
    copy" is a clone of the host buffer: the mechanism runs (and is tested) with nothing to transfer.
    """

    def __init__(self, layers: list[nn.Module], device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.layers = [self._take(layer) for layer in layers]
        self.host_bytes = sum(entry.host.nbytes for entry in self.layers)
        self.fetched_bytes = self.resident_bytes = self.peak_resident_bytes = 0
        self._backward_task: int | None = None  # the backward whose end releases the last layer

    def _take(self, layer: nn.Module) -> _LayerBase:
        from .nf4 import NF4Weight

        slots = []
        for module in layer.modules():
            if isinstance(module, NF4Weight):
                module.cache_absmax = False  # a cache would keep the device copy alive past its release
                slots += [(module, name, True) for name, p in module.named_parameters(recurse=False) if p is not None]
                slots += [(module, name, False) for name, b in module.named_buffers(recurse=False) if b is not None]
        slots.sort(key=lambda slot: (slot[1] != "packed", -self._get(slot).element_size()))
        tensors = [self._get(slot).detach() for slot in slots]
        host = torch.empty(_layout(tensors)[1], dtype=torch.uint8)
        if self.device.type == "cuda" and host.nbytes:
            _pin(host)
        host_views = _views(host, tensors)
        for view, tensor in zip(host_views, tensors):
            view.copy_(tensor)
        entry = _LayerBase(slots, host, host_views)
        self._point(entry, host_views)  # the loaded copy (on the device or the host) is freed here
        return entry

    @staticmethod
    def _get(slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
        module, name, _ = slot
        return getattr(module, name)

    @staticmethod
    def _point(entry: _LayerBase, tensors: list[torch.Tensor]) -> None:
        for (module, name, is_param), tensor in zip(entry.slots, tensors):
            if is_param:
                module._parameters[name].data = tensor
            else:
                module._buffers[name] = tensor

    def _fetch(self, index: int) -> None:
        """Start layer `index`'s copy to the device (on the side stream under CUDA)."""
        entry = self.layers[index]
        if entry.on_device is not None or not entry.host.nbytes:
            return
        if self.stream is None:
            entry.on_device = entry.host.clone()
        else:
            target = torch.empty_like(entry.host, device=self.device)  # memory of the compute stream
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                target.copy_(entry.host, non_blocking=True)
            target.record_stream(self.stream)
            entry.on_device, entry.ready = target, self.stream.record_event()
        self.fetched_bytes += entry.host.nbytes
        self.resident_bytes += entry.host.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _use(self, index: int) -> None:
        """Layer `index`'s registered tensors point at its device copy (waited for)."""
        entry = self.layers[index]
        self._fetch(index)
        if entry.on_device is None:  # a layer without NF4 tensors
            return
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            entry.ready = None
        self._point(entry, _views(entry.on_device, entry.host_views))

    def _release(self, index: int) -> None:
        entry = self.layers[index]
        if entry.on_device is None:
            return
        self._point(entry, entry.host_views)
        entry.on_device, entry.ready = None, None  # (the compute stream's later work is ordered after its use)
        self.resident_bytes -= entry.host.nbytes

    def release_all(self) -> None:
        for index in range(len(self.layers)):
            self._release(index)
        self._backward_task = None

    def before_forward(self, index: int) -> None:
        for other in range(len(self.layers)):  # anything left from an interrupted pass
            if other not in (index, index + 1):
                self._release(other)
        self._use(index)
        if index + 1 < len(self.layers):
            self._fetch(index + 1)

    def after_forward(self, index: int) -> None:
        self._release(index)

    def before_recompute(self, index: int) -> None:
        """Backward reached layer `index`: the layer after it is done (backward runs the layers in reverse)."""
        task = torch._C._current_graph_task_id()
        if self._backward_task != task:
            self._backward_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self.release_all)
        for other in range(len(self.layers)):
            if other not in (index, index - 1):
                self._release(other)
        self._use(index)
        if index > 0:
            self._fetch(index - 1)


def install_base_offload(model: nn.Module, device: torch.device | str) -> BaseOffloader:
    """Keep the NF4 base of `model`'s decoder layers in host memory, fetched layer by layer (offload_base).

    Call after `train.enable_checkpointing`. The layers' NF4 tensors move to (pinned) host memory; every
    other tensor of the model (embeddings, norms, head, LoRA, NF4 outside the layers) moves to `device`.
    The forward hooks sit on the layers; the backward's recompute is seen inside the layer's checkpoint
    call (transformers checkpoints `forward`, not `__call__`, so module hooks do not run again there).
    """
    marked = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and callable(getattr(m, "_gradient_checkpointing_func", None))]
    # the decoder layers, in order (transformers also marks the model holding them, which checkpoints nothing)
    layers = [m for m in marked if not any(c is not m for c in m.modules() if c in marked)]
    if not layers:
        raise TrainingError("offload_base fetches each layer's base again for the backward's recompute: set "
                            "gradient_checkpointing: true")
    device = torch.device(device)
    offloader = BaseOffloader(layers, device)
    # the rest to the device by `model.to` (tied weights stay tied), the offloaded tensors unregistered meanwhile
    slots = [(module, name, is_param) for entry in offloader.layers for module, name, is_param in entry.slots]
    held = [getattr(module, name) for module, name, _ in slots]
    for module, name, is_param in slots:  # None, not removed: the registration order stays
        (module._parameters if is_param else module._buffers)[name] = None
    model.to(device)
    for (module, name, is_param), tensor in zip(slots, held):
        (module._parameters if is_param else module._buffers)[name] = tensor
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, _a, _i=index: offloader.before_forward(_i))
        layer.register_forward_hook(lambda _m, _a, _o, _i=index: offloader.after_forward(_i))
        inner = layer._gradient_checkpointing_func

        def checkpointed(function, *args, _inner=inner, _i=index, **kwargs):
            def run(*run_args, **run_kwargs):
                if torch._C._current_graph_task_id() != -1:  # the recompute, inside backward
                    offloader.before_recompute(_i)
                return function(*run_args, **run_kwargs)

            return _inner(run, *args, **kwargs)

        layer._gradient_checkpointing_func = checkpointed
    return offloader
