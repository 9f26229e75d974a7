"""Optimizer state for parameters sharded by FSDP2 (DTensors sharded on dim 0 of a 1-D mesh).

A checkpoint of sharded optimizer state is only right if every state tensor is a DTensor with
``Shard``/``Replicate`` placements and nothing stored depends on the world size. So for a sharded
parameter with ``rows x cols`` (see :mod:`lightning_lowmem.partition.spec`):

* ``exp_avg`` and an elementwise ``exp_avg_sq`` are DTensors laid out like the parameter;
* a ``row`` second moment (one value per row, rows on dim 0) is a ``[rows]`` DTensor sharded on
  dim 0: FSDP2 splits rows the way ``torch.chunk`` does, so every rank holds the statistics of
  exactly its rows and needs no communication;
* any other block statistic (heads, tensors, fused segments, rows of a transposed weight whose
  columns are split) is a replicated ``[blocks]`` DTensor: each rank computes partial block means of
  its local rows, and ONE all-reduce per step sums all of them (:func:`all_reduce_block_means`).

Example::

    >>> sharding = ParamSharding.of(param, transposed=False)
    >>> sharding.local_rows(rows=param.shape[0])     # (start, stop) of this rank's rows
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard


def to_local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclasses.dataclass(frozen=True)
class ParamSharding:
    """Where a parameter's rows live: on one device mesh, split on dim 0 or replicated.

    Args:
        mesh: the DTensor's device mesh (``None`` for a plain tensor).
        row_sharded: the parameter is ``Shard(0)`` and its rows are dim 0 (not transposed).
        split_columns: the parameter is ``Shard(0)`` but its rows are dim 1 (GPT-2 ``Conv1D``):
            every rank holds every row, with only part of its columns.
    """

    mesh: object = None
    row_sharded: bool = False
    split_columns: bool = False

    @classmethod
    def of(cls, param: Tensor, transposed: bool) -> ParamSharding:
        """Read the sharding of ``param``.

        Raises:
            ValueError: for meshes with more than one dimension or placements other than
                ``Shard(0)``/``Replicate()``.
        """
        if not isinstance(param, DTensor):
            return cls()
        mesh, placements = param.device_mesh, tuple(param.placements)
        if mesh.ndim != 1 or placements not in ((Shard(0),), (Replicate(),)):
            raise ValueError(
                f"Only parameters sharded on dim 0 of a 1-D device mesh (FSDP2 data parallel) or replicated "
                f"are supported, got placements {placements} on a {mesh.ndim}-D mesh."
            )
        sharded = placements == (Shard(0),)
        return cls(mesh, row_sharded=sharded and not transposed, split_columns=sharded and transposed)

    @property
    def is_distributed(self) -> bool:
        return self.mesh is not None

    def local_rows(self, rows: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's rows under ``torch.chunk``-style splitting."""
        return self.local_dim0(rows) if self.row_sharded else (0, rows)

    def local_dim0(self, size: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's slice of the parameter's dim 0 (of ``size``): where its
        local tensor sits in the whole one (``(0, size)`` unless the parameter is ``Shard(0)``)."""
        if not (self.row_sharded or self.split_columns):
            return 0, size
        world, rank = self.mesh.size(), self.mesh.get_local_rank()
        chunk = math.ceil(size / world) if size else 0
        return min(rank * chunk, size), min((rank + 1) * chunk, size)

    def needs_reduction(self, elementwise: bool, one_block_per_row: bool) -> bool:
        """Whether block statistics must be summed across ranks."""
        if elementwise or not self.is_distributed:
            return False
        return self.split_columns or (self.row_sharded and not one_block_per_row)

    def new_block_state(self, local: Tensor, global_shape: tuple[int, ...], sharded: bool) -> Tensor:
        """Wrap ``local`` as a DTensor of ``global_shape``: sharded on dim 0, or replicated."""
        if not self.is_distributed:
            return local
        placements = [Shard(0)] if sharded else [Replicate()]
        stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=global_shape, stride=stride)


def all_reduce_block_means(means: list[Tensor], mesh: object) -> list[Tensor]:
    """Sum partial block means across the mesh in ONE all-reduce of one flat buffer."""
    if not means:
        return means
    dtypes = [m.dtype for m in means]
    common = functools.reduce(torch.promote_types, dtypes)  # float64 and float32 mixed: one buffer in float64
    flat = torch.cat([m.reshape(-1).to(common) for m in means])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group())
    out, offset = [], 0
    for m, dtype in zip(means, dtypes):
        out.append(flat[offset : offset + m.numel()].view_as(m).to(dtype))
        offset += m.numel()
    return out
