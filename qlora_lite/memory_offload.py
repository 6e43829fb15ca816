"""The planner's terms for what lives in host memory instead of on the GPU (offload.py).

    offload_activations   the L checkpointed block inputs live in pinned host memory (`pinned_host_bytes`);
                          the GPU keeps OFFLOAD_RESIDENT_INPUTS = 2 of them (the one in use, the one in flight);
                          each step copies them out in forward and back in backward: `transfer_bytes`,
                          `transfer_seconds` at `link_gbps` (PCIe 4.0 x16 ≈ 25 GB/s by default)
    mlp_chunk_tokens      the recomputed block keeps the MLP's input (b·h per token) instead of its
                          intermediates; one chunk's (batch·chunk tokens) are alive during its backward,
                          and the backward workspace holds one chunk's token × intermediate buffers
                          (both computed with the block formula in memory.py)

offload_base (offload.BaseOffloader), computed here:

    pinned host   every decoder layer's NF4 bytes (packed + scales, as NF4Weight.nbytes), held all run
    GPU           the NF4 outside the layers (none in a Llama: the head stays 16-bit)
                  + OFFLOAD_RESIDENT_LAYERS × one layer's NF4: the layer computing and the next one in flight
                  (forward: i and i+1; backward: i and i-1, the layer after i released at i's recompute)
    host↔GPU      each layer's base twice per micro-step: before its forward and before its backward's
                  recompute (gradient checkpointing), i.e. 2 × the pinned bytes, one way (host → GPU)

Everything else (16-bit weights, LoRA, optimizer, activations) is on the GPU as without the option.
On CPU ("host" and "device" are one memory) the base stays whole and the in-flight layers are copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import QuantConfig
from .memory_arch import GB, GiB, ModelShape, layer_index
from .nf4 import nf4_nbytes

__all__ = ["PCIE4_X16_GBPS", "OFFLOAD_RESIDENT_INPUTS", "OFFLOAD_RESIDENT_LAYERS", "BaseOffload", "base_offload", "offload_lines"]

PCIE4_X16_GBPS = 25.0  # GB/s a host↔GPU copy of pinned memory reaches on PCIe 4.0 x16 (nominal 31.5)
OFFLOAD_RESIDENT_INPUTS = 2  # offloaded block inputs on the GPU at once: the one in use + the one in flight
OFFLOAD_RESIDENT_LAYERS = 2  # layers whose NF4 base is on the GPU at once: the one computing + the one in flight


@dataclass(frozen=True)
class BaseOffload:
    gpu_bytes: int  # NF4 bytes on the compute device at the peak
    host_bytes: int  # NF4 bytes in pinned host memory (0 on CPU: nothing is moved off the device)
    transfer_bytes: int  # host → GPU bytes per micro-step


def base_offload(a: ModelShape, quant: QuantConfig, device: str) -> BaseOffload:
    """The NF4 base's split between the GPU and pinned host memory under offload_base."""
    per_layer = [0] * a.layers
    outside = 0
    for name, (count, o, i) in a.matrices.items():  # linears, and expert projections once per expert
        nbytes = count * nf4_nbytes(o * i, quant.blocksize, quant.double_quant)
        index = layer_index(name)
        if index is None:
            outside += nbytes
        else:
            per_layer[index] += nbytes
    in_flight = sum(sorted(per_layer, reverse=True)[:OFFLOAD_RESIDENT_LAYERS])
    offloaded = sum(per_layer)
    if device != "cuda":  # the host copy is the model; the layers in use are clones of it
        return BaseOffload(outside + offloaded + in_flight, 0, 0)
    return BaseOffload(outside + in_flight, offloaded, 2 * offloaded)


def offload_lines(est: Any) -> list[str]:
    """The table's lines for the host offloads of a MemoryEstimate (block inputs, NF4 base)."""
    lines = []
    activations, base = est.detail.get("offloaded_block_inputs", 0), est.detail.get("offloaded_base", 0)
    if activations:
        lines.append(f"offloaded activations: {activations / GiB:.2f} GiB of block inputs in pinned host memory")
    if base:
        lines.append(f"offloaded base: {base / GiB:.2f} GiB of NF4 layers in pinned host memory, "
                     f"{OFFLOAD_RESIDENT_LAYERS} layers' on the GPU at a time")
    if est.pinned_host_bytes:
        lines.append(f"pinned host memory: {est.pinned_host_bytes / GiB:.2f} GiB; host<->GPU "
                     f"{est.transfer_bytes / GiB:.2f} GiB per micro-step, {est.transfer_seconds:.2f} s at "
                     f"{est.link_gbps:g} GB/s ({est.transfer_bytes / GB:.1f} GB)")
    return lines
