"""Sums and gathers across ranks that count every piece of a tensor once (no Lightning inside).

Under FSDP2 a parameter (and its optimizer state) is a ``DTensor``: ``Shard(0)`` tensors hold a
different part on every rank, ``Replicate()`` tensors the same values everywhere, and plain tensors
(a ``step`` counter, or every tensor of a DDP run) a full copy on every rank. A global sum adds the
shards of every rank and a replicated value once (from the first rank of the mesh):
:func:`owned_part` gives the part of a tensor this rank adds, :func:`sum_over_mesh` adds the
per-rank sums in one all-reduce. Only 1-D meshes over all processes are supported (FSDP2 data
parallelism, see :mod:`lightning_lowmem.optim.sharding`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def mesh_of(tensors: Iterable[Tensor]) -> object | None:
    """The device mesh of the first ``DTensor`` among ``tensors``; ``None`` if there is none."""
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            return tensor.device_mesh
    return None


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds a different part on every rank (a ``DTensor`` with a ``Shard`` placement)."""
    return isinstance(tensor, DTensor) and any(placement.is_shard() for placement in tensor.placements)


def owned_part(tensor: Tensor, mesh: object | None) -> Tensor | None:
    """The local values this rank adds to a sum over ``mesh``, or ``None`` when it adds nothing.

    A shard is always this rank's own; a replicated ``DTensor``, or a plain tensor when the sum runs
    over a mesh, is added by the mesh's first rank only. Without a mesh a plain tensor is all local.
    """
    if is_sharded(tensor):
        return tensor.to_local()
    if isinstance(tensor, DTensor):
        return tensor.to_local() if tensor.device_mesh.get_local_rank() == 0 else None
    if mesh is not None and mesh.get_local_rank() != 0:
        return None
    return tensor


def collective_device(group: object | None = None) -> torch.device:
    """Where a tensor must be for a collective of ``group``'s backend (CUDA for NCCL, else CPU)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_mesh(values: Tensor, mesh: object | None) -> Tensor:
    """``values`` summed over the ranks of ``mesh`` with one all-reduce (``values`` itself without a mesh)."""
    if mesh is None:
        return values
    group = mesh.get_group()
    buffer = values.to(collective_device(group))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.to(values.device)


def gather_over_mesh(values: Tensor, mesh: object | None) -> Tensor:
    """``values`` of every rank of ``mesh`` stacked on a new dim 0 (one all-gather; ``[1, ...]`` without a mesh)."""
    if mesh is None:
        return values.unsqueeze(0)
    return gather_over_group(values, mesh.get_group())


def gather_over_group(values: Tensor, group: object | None = None) -> Tensor:
    """``values`` of every rank of ``group`` (default: all processes) stacked on a new dim 0.

    ``[1, ...]`` when no process group is initialized.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values.unsqueeze(0)
    buffer = values.to(collective_device(group))
    out = [torch.empty_like(buffer) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buffer, group=group)
    return torch.stack(out).to(values.device)
