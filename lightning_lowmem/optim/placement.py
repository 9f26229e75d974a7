"""Where a parameter's rows and its second-moment state live: its :class:`Placement`.

A parameter of the :class:`~lightning_lowmem.partition.BlockPlan` is updated as a row view (see
:class:`~lightning_lowmem.kernels.RowLayout`). This module decides, once per parameter, which rows of
that view this rank holds (under FSDP2, :class:`~lightning_lowmem.optim.sharding.ParamSharding`),
the :class:`RowLayout` of those rows (:func:`layout_for`), and whether the block means of the local
rows are partial sums to all-reduce. A parameter with bank dims (experts) whose blocks never span two
banks is split into banks instead (:func:`split_banks`): whole banks stay on a rank with their state,
and each bank is updated as its own 2-D matrix (:func:`one_bank`).

A placement also keeps the global flat index of the local tensor's first entry (``flat_offset``),
from which stochastic rounding draws the random bits of the whole parameter (see
:func:`~lightning_lowmem.kernels.momentum_formats.stochastic_round_bf16`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from lightning_lowmem.kernels import RowLayout
from lightning_lowmem.optim.sharding import ParamSharding, to_local
from lightning_lowmem.partition import ParamBlocks


class Placement(NamedTuple):
    """A parameter's local layout and where its rows live (cached per parameter)."""

    layout: RowLayout
    sharding: ParamSharding
    reduce: bool  # its block means are partial sums that must be all-reduced
    rows: tuple[int, int]  # this rank's rows of the row view (of dim 0 for a bank)
    bank_shape: tuple[int, ...] | None = None  # a bank's shape when each bank is its own 2-D matrix
    flat_offset: int = 0  # the flat index, in the whole parameter, of the local tensor's first entry

    def index_base(self, bank: int = 0) -> int:
        r"""The global flat index of the first entry of the local tensor, or of its ``bank``-th local bank:
        :math:`\mathrm{start}_0 \cdot n_0 + \mathrm{bank} \cdot n_\mathrm{bank}`, with
        :math:`\mathrm{start}_0` this rank's first index of dim 0, :math:`n_0` the entries per index
        of dim 0 and :math:`n_\mathrm{bank}` the entries of a bank."""
        return self.flat_offset + (bank * math.prod(self.bank_shape) if bank else 0)


def place(entry: ParamBlocks, param: torch.Tensor) -> Placement:
    """The :class:`Placement` of ``param``, whose plan entry is ``entry``, on this rank."""
    if split_banks(entry):
        # dim 0 indexes banks (experts) and no block spans two: FSDP2 keeps whole banks on a
        # rank and their state with them, and each bank is updated as a 2-D matrix
        sharding = ParamSharding.of(param, transposed=False)
        start, stop = sharding.local_rows(entry.shape[0])
        layout = layout_for(one_bank(entry), to_local(param).device)
        return Placement(layout, sharding, False, (start, stop), bank_shape=entry.shape[entry.bank_dims:],
                         flat_offset=_flat_offset(sharding, param))
    sharding = ParamSharding.of(param, entry.transposed)
    start, stop = sharding.local_rows(entry.rows)
    layout = layout_for(entry, to_local(param).device, rows=slice(start, stop))
    reduce = sharding.needs_reduction(layout.elementwise, one_block_per_row=layout.group_index is None)
    return Placement(layout, sharding, reduce, (start, stop), flat_offset=_flat_offset(sharding, param))


def _flat_offset(sharding: ParamSharding, param: torch.Tensor) -> int:
    """The global flat index of the first entry of ``param``'s local tensor (a dim-0 slice of it)."""
    if param.dim() == 0:
        return 0
    return sharding.local_dim0(param.shape[0])[0] * math.prod(param.shape[1:])


def split_banks(entry: ParamBlocks) -> bool:
    """Whether the parameter is updated bank by bank (it has bank dims and shared blocks)."""
    return entry.bank_dims > 0 and not entry.is_full


def one_bank(entry: ParamBlocks) -> ParamBlocks:
    """The layout of one bank of ``entry`` (the same for every bank)."""
    return dataclasses.replace(entry, shape=entry.shape[entry.bank_dims:], bank_dims=0, aliases=())


def layout_for(entry: ParamBlocks, device: torch.device, rows: slice = slice(None)) -> RowLayout:
    """The :class:`RowLayout` of a parameter of the plan for its ``rows`` held here, on ``device``."""
    if entry.is_full:
        return RowLayout(transposed=entry.transposed, elementwise=True)
    index = entry.group_index(device)
    if index is not None:
        index = index[rows]
    if index is None:
        return RowLayout(transposed=entry.transposed, elementwise=False, group_numel=float(entry.cols))
    sizes = torch.tensor(entry.group_sizes(), dtype=torch.float64, device=device) * entry.cols
    return RowLayout(transposed=entry.transposed, elementwise=False, group_index=index, group_numel=sizes)
