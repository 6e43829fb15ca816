"""Whole and local views of a tensor that may be a DTensor (one rank's shard under FSDP2), and nothing else.

Kept apart from `fsdp` so that modules below it (the adapter writer) can gather a possibly sharded
tensor without importing the sharding, loading and training machinery.
"""

from __future__ import annotations

import torch

__all__ = ["copy_into_parameter", "full_tensor", "local_tensor"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for a sharded DTensor; a no-op otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_into_parameter(param: torch.Tensor, value: torch.Tensor) -> None:
    """param ← value, where `param` may be this rank's shard of a DTensor and `value` the whole tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
        param.copy_(value)
