"""How a block-Adam update sees a tensor: as rows, with a second moment per entry or per block.

:class:`RowLayout` is the one type the block-Adam reference and every backend read; the partitioner
(:mod:`lightning_lowmem.partition`) decides the blocks and the optimizers build a layout per tensor.
:func:`as_rows` is the one place that turns a tensor into its ``rows x cols`` view: a new way of
laying a parameter out (expert banks, interleaved fused QKV) extends these two.

Example::

    >>> w = torch.zeros(8, 3, 4)
    >>> as_rows(w).shape, as_rows(torch.zeros(4, 6), transposed=True).shape
    (torch.Size([8, 12]), torch.Size([6, 4]))
    >>> RowLayout(elementwise=False, group_numel=12.0)   # one second moment per row of 12 entries
    RowLayout(transposed=False, elementwise=False, group_index=None, group_numel=12.0)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RowLayout(NamedTuple):
    """How a tensor is viewed as rows and how its rows share second moments.

    Args:
        transposed: the rows are dim 1 of a 2-D tensor (GPT-2 ``Conv1D``).
        elementwise: ``v`` has the tensor's shape (AdamW); the other fields are unused.
        group_index: for each row, the index of its block in ``v``; ``None`` when row ``r`` is
            block ``r``.
        group_numel: entries per block (a tensor of one value per block), or the column count
            when every row is its own block. Under sharding these are *global* counts, so a
            block's local sum divided by them is the local share of the global mean.
    """

    transposed: bool = False
    elementwise: bool = True
    group_index: Tensor | None = None
    group_numel: Tensor | float = 1.0


def as_rows(tensor: Tensor, transposed: bool = False) -> Tensor:
    """A ``rows x cols`` view of ``tensor`` (no copy): dim 0 against the rest, or ``.t()``."""
    if transposed:
        return tensor.t()
    if tensor.dim() == 0:
        return tensor.view(1, 1)
    return tensor.view(tensor.shape[0], -1)


def state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of second-moment state: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32
