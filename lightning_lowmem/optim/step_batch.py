"""One optimizer step's batch of local tensors: what the functional core is given per param group.

:class:`GroupBatch` collects, for the parameters of a group that have a gradient this step, the
local (this rank's) parameter, gradient, momentum, second moment, step and :class:`RowLayout`, as
the lists :func:`lightning_lowmem.optim.functional.block_adam` takes. A parameter updated bank by
bank (see :mod:`lightning_lowmem.optim.placement`) adds one entry per local bank. The block means
whose rows span ranks are computed and summed for all groups at once by :func:`reduce_block_means`.

What stochastic rounding draws depends only on where an entry sits in the whole model, never on
the rank: each entry keeps the parameter's position in ``group["params"]`` (the seed of all its
banks) and the global flat index of its first entry (:meth:`Placement.index_base`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightning_lowmem.kernels import RowLayout
from lightning_lowmem.kernels.block_adam import block_mean_sq
from lightning_lowmem.kernels.momentum_formats import MomentumFormat, QuantizedMomentum
from lightning_lowmem.optim.momentum_state import SCALE_KEY
from lightning_lowmem.optim.placement import Placement
from lightning_lowmem.optim.sharding import all_reduce_block_means, to_local


@dataclasses.dataclass
class GroupBatch:
    """The local tensors of one param group that have a gradient this step."""

    params: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avgs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    steps: list[torch.Tensor] = dataclasses.field(default_factory=list)
    layouts: list[RowLayout] = dataclasses.field(default_factory=list)
    placements: list[Placement] = dataclasses.field(default_factory=list)
    mean_sqs: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    formats: list[MomentumFormat | None] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)  # the parameter's index in group["params"]
    index_bases: list[int] = dataclasses.field(default_factory=list)  # global flat index of the first entry

    def add(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], placement: Placement,
            fmt: MomentumFormat | None, position: int) -> None:
        """Add ``param`` (the ``position``-th of its group), or each of its local banks."""
        if placement.bank_shape is not None:
            self._add_banks(param, grad, state, placement, fmt, position)
            return
        exp_avg, scales = to_local(state["exp_avg"]), state.get(SCALE_KEY)
        if fmt is not None:
            exp_avg = QuantizedMomentum(exp_avg, None if scales is None else to_local(scales))
        self._append(to_local(param), to_local(grad), exp_avg, to_local(state["exp_avg_sq"]), state["step"],
                     placement, fmt, position, placement.index_base())

    def _add_banks(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], placement: Placement,
                   fmt: MomentumFormat | None, position: int) -> None:
        """Each local bank (expert) as its own tensor: views of the parameter, gradient and state.
        The functional core increments every step it is given, so banks after the first get a copy."""
        shape = placement.bank_shape
        # views (not copies) of what is updated in place; the gradient is only read
        params, grads = to_local(param).view(-1, *shape), to_local(grad).reshape(-1, *shape)
        exp_avgs = to_local(state["exp_avg"]).view(-1, *shape)
        v = to_local(state["exp_avg_sq"]).view(params.shape[0], -1)
        for b in range(params.shape[0]):
            self._append(params[b], grads[b], exp_avgs[b] if fmt is None else QuantizedMomentum(exp_avgs[b]), v[b],
                         state["step"] if b == 0 else state["step"].clone(), placement, fmt, position,
                         placement.index_base(b))

    def _append(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor | QuantizedMomentum,
                exp_avg_sq: torch.Tensor, step: torch.Tensor, placement: Placement, fmt: MomentumFormat | None,
                position: int, index_base: int) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(exp_avg)
        self.exp_avg_sqs.append(exp_avg_sq)
        self.steps.append(step)
        self.layouts.append(placement.layout)
        self.placements.append(placement)
        self.mean_sqs.append(None)
        self.formats.append(fmt)
        self.positions.append(position)
        self.index_bases.append(index_base)


def reduce_block_means(batches: list[GroupBatch]) -> None:
    """Compute the partial block means that span ranks and sum them all in one collective."""
    pending = [(b, i) for b in batches for i, placement in enumerate(b.placements) if placement.reduce]
    if not pending:
        return
    meshes = {id(b.placements[i].sharding.mesh): b.placements[i].sharding.mesh for b, i in pending}
    if len(meshes) > 1:
        raise ValueError("All sharded parameters of one optimizer must live on the same device mesh.")
    partial = [block_mean_sq(b.grads[i], b.layouts[i]) for b, i in pending]
    reduced = all_reduce_block_means(partial, next(iter(meshes.values())))
    for (b, i), mean_sq in zip(pending, reduced):
        b.mean_sqs[i] = mean_sq
