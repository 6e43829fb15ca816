"""The quantized base sharded across processes with PyTorch's FSDP2 (`fully_shard`).

    LoRALinear4bit.weight = NF4Weight: packed uint8 (n/2, 1) · absmax (codes uint8 | fp32 bits) ·
        │                   nested absmax (fp32 bits) as frozen parameters, offset (1,) a buffer
        │ fully_shard(every decoder block), fully_shard(root): no conversion, the storage is already
        ▼ registered frozen parameters
    every parameter a DTensor sharded on dim 0: rank k keeps ~1/N of each tensor (bytes, scales, LoRA)
        forward / backward of a block: FSDP all-gathers its bytes ─► dequantize ─► matmul ─► frees them

Loading (`load_sharded`): rank 0 reads and quantizes the checkpoint once; the other processes
build the same model on the meta device (no memory) and receive each whole tensor by broadcast,
keeping their slice. The host holds one whole NF4 model (rank 0's) and the checkpoint is read
once. A checkpoint already in NF4, or a model handed in, is loaded in turns instead (`in_turns`):
process k loads the whole model, keeps its slices, frees the rest, then k+1 starts.

Why plain uint8/int32 parameters rather than bitsandbytes' `quant_storage` or a tensor subclass:
FSDP2 shards each parameter on its own and all-gathers mixed dtypes through one uint8 buffer, so
the bytes need not be disguised as bf16 (FSDP1's flat parameters had to be of one dtype, which is
why QLoRA+FSDP1 stored NF4 in the compute dtype), and no subclass has to teach FSDP ~40 tensor ops
(torchao's NF4Tensor). The quantization metadata (shape, dtype, block size) are Python attributes
of the module, and the absmax tensors are sharded too, so a rank keeps 1/N of all 4.127 bits.
Parameter counts and state-dict keys (bitsandbytes') are the same before and after sharding.

No communication is written here: FSDP2 all-gathers and reduce-scatters; the helpers below only
gather the small LoRA tensors and the optimizer state for checkpoints, through DTensor / DCP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from .config import LoraConfig, QuantConfig
from .dtensor import copy_into_parameter, full_tensor, local_tensor
from .errors import QLoraLiteError, TrainingError
from .inject import ParameterCount, count_parameters, lora_layers
from .load import is_prequantized, load_model, load_skeleton, release_free_memory
from .nf4 import NF4Weight

__all__ = ["shard_model", "load_sharded", "fsdp_mesh", "in_turns", "resident_base_bytes",
           "full_tensor", "ensure_process_group", "sharded_optimizer_state", "load_sharded_optimizer_state",
           "copy_into_parameter"]

T = TypeVar("T")


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; a single process (a one-GPU smoke run) gets a private one."""
    import torch.distributed as dist

    if not dist.is_available():
        raise TrainingError("fsdp=true needs torch.distributed, which this PyTorch build lacks; install a build "
                            "with distributed support or train without fsdp")
    backend = "nccl" if device.type == "cuda" else "gloo"
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        raise TrainingError(f"fsdp=true on {device.type} needs the {backend} backend, which this PyTorch build "
                            f"lacks; use device={'cpu' if backend == 'nccl' else 'cuda'} or a build with {backend}")
    if dist.is_initialized():
        if dist.get_backend() not in (backend, f"cpu:gloo,cuda:{backend}", f"cuda:{backend},cpu:gloo"):
            raise TrainingError(f"the process group uses backend {dist.get_backend()!r} but the model is on "
                                f"{device.type}, which needs {backend!r}; launch with a matching device")
        return
    # an in-memory store: nothing to rendezvous with, no port to pick, no file left behind
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _block_classes(model: nn.Module) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise TrainingError(f"{type(model).__name__} does not name its transformer blocks (_no_split_modules); "
                            "FSDP needs them to shard block by block")
    return classes


def fsdp_mesh(device: torch.device):
    """The 1-D device mesh over all processes (collective: every process calls it together)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(device)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def in_turns(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then rank 1, ...: the others wait at a barrier (a staggered load)."""
    import torch.distributed as dist

    result = None
    for turn in range(dist.get_world_size()):
        if turn == dist.get_rank():
            result = fn()
        dist.barrier()
    return result


def _without_absmax_cache(model: nn.Module) -> None:
    # A cached decoded absmax would be a whole (unsharded) fp32 copy on every rank; FSDP decodes per call.
    for module in model.modules():
        if isinstance(module, NF4Weight):
            module.cache_absmax = False


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by its registered name, as `set_model_state_dict` lists
    them for a broadcast (a tied tensor under each of its names)."""
    named: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in module.named_parameters(recurse=False):
            named[dot + name] = param.detach()
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                named[dot + name] = buffer
    return named


def _fsdp_refuses_integer_parameters() -> bool:
    """FSDP2 before torch 2.13 wraps each shard as `nn.Parameter(x)`, i.e. requires_grad=True, which
    refuses the NF4 storage's integer tensors (seen on torch 2.11 + CUDA 13: "only Tensors of floating
    point dtype can require gradients"); 2.13 passes the original parameter's requires_grad."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) < (2, 13)


@contextlib.contextmanager
def _integer_parameters_allowed() -> Iterator[None]:
    """While sharding, FSDP2's module-level `nn` creates integer parameters without gradients; FSDP sets
    each shard's requires_grad from the original parameter right after, as 2.13 does in one call."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = _fsdp_param.nn

    class _NN:
        def __getattr__(self, name: str):
            return getattr(original, name)

        @staticmethod
        def Parameter(data=None, requires_grad: bool = True):  # noqa: N802 - stands in for nn.Parameter
            floating = data is not None and (data.is_floating_point() or data.is_complex())
            return original.Parameter(data, requires_grad=requires_grad and floating)

    _fsdp_param.nn = _NN()
    try:
        yield
    finally:
        _fsdp_param.nn = original


def _fully_shard(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    blocks = _block_classes(model)
    compat = _integer_parameters_allowed() if _fsdp_refuses_integer_parameters() else contextlib.nullcontext()
    with compat:
        for module in [m for m in model.modules() if isinstance(m, blocks)]:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)


def shard_model(model: nn.Module, device: torch.device, mesh=None) -> nn.Module:
    """Shard the model with FSDP2 over all ranks (the NF4 storage is sharded as it is).

    Each transformer block is one FSDP unit (all-gathered for its forward and again for its
    backward, freed in between); the root unit holds embeddings, final norm and head. Sharding
    itself communicates nothing (each process keeps its slice of its own full tensors), which is
    why processes may shard one after another (`in_turns`); `mesh` comes from `fsdp_mesh`.
    """
    _without_absmax_cache(model)
    _fully_shard(model, mesh if mesh is not None else fsdp_mesh(device))
    return model


def load_sharded(path, quant: QuantConfig, lora: LoraConfig | None, device: torch.device,
                 compute_dtype: torch.dtype, mesh) -> tuple[nn.Module, object, ParameterCount]:
    """Read and quantize the checkpoint once, on rank 0; every rank receives its shards by broadcast.

    Rank 0 loads the whole model (quantizing on `device`, keeping the bytes on the host under CUDA);
    the others build the same model on the meta device (`load_skeleton`); all shard it, then
    `set_model_state_dict(broadcast_from_rank0=True)` sends one whole tensor at a time from rank 0
    and each rank keeps its slice. A load error on rank 0 is raised on every rank.
    Collective: every process calls it. Returns `(model, tokenizer, parameter count)`.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if quant is None or is_prequantized(path):
        raise TrainingError(f"load_sharded quantizes a 16-bit checkpoint at load; {path} with quant={quant} "
                            "loads with load_model + shard_model in turns (fsdp.in_turns)")
    whole: dict[str, torch.Tensor] = {}
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            storage = torch.device("cpu") if device.type == "cuda" else None
            model, tokenizer = load_model(path, quant, lora, device=device, compute_dtype=compute_dtype,
                                          storage_device=storage)
        except QLoraLiteError as exc:
            outcome = [exc]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    if dist.get_rank() != 0:
        model, tokenizer = load_skeleton(path, quant, lora, device, compute_dtype)
    params = count_parameters(model)
    _without_absmax_cache(model)
    if dist.get_rank() == 0:
        # the whole tensors, on the host, until they have been sent; by registered name, which is how
        # set_model_state_dict matches them (the state dict's bitsandbytes keys name no parameter)
        whole = _named_tensors(model)
    _fully_shard(model, mesh)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    whole.clear()
    release_free_memory()
    return model, tokenizer, params


def resident_base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base this rank holds (its shards under FSDP; everything otherwise)."""
    total = 0
    for layer in lora_layers(model).values():
        weight = layer.weight
        tensors = [*weight.parameters(), *weight.buffers()] if layer.quantized else [weight]
        total += sum(local_tensor(t).numel() * t.element_size() for t in tensors)
    return total


def sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state, keyed by parameter name, on rank 0 (collective; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a whole optimizer state (from `sharded_optimizer_state`) onto this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
