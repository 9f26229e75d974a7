r"""MicroAdam's window entries: a selected coordinate's index and value in one int32.

Each entry is the selected value rounded to bfloat16, as the bits of that fp32 number (whose low
16 bits are then zero), with the coordinate's index relative to its block (``< 2**15``) in those
low 16 bits: an int16 index and a bf16 value in 4 bytes. One int32 rather than an int16 and a
bf16 tensor because neither gloo nor NCCL all-gathers int16, and gathering every state tensor is
how a full (single-file) checkpoint of sharded state is written.

Example::

    >>> unpack_window_entries(pack_window_entries(torch.tensor([5, 0]), torch.tensor([-1.5, 3.0])))
    (tensor([5, 0], dtype=torch.int32), tensor([-1.5000,  3.0000]))
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bits of a window entry holding the index (the rest hold the value rounded to bf16).
_INDEX_MASK = 0xFFFF

_VALUE_MASK = -65536  # 0xFFFF0000 as an int32


def round_to_bf16(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), still fp32, so ``.to(torch.bfloat16)`` is exact.

    Done on the bits: ``torch.compile`` may drop a ``.to(bfloat16).float()`` round trip inside a graph
    (and Triton's interpreter truncates), while the quantisation must use the min/max it stores.

    Example::

        >>> round_to_bf16(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8]))  # ties: to even
        tensor([1.0000, 1.0156])
    """
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & _VALUE_MASK).view(torch.float32)


def pack_window_entries(indices: Tensor, values: Tensor) -> Tensor:
    """int32 window entries: ``values`` rounded to bf16 (as fp32 bits) with ``indices`` in the low 16 bits.

    Example::

        >>> entries = pack_window_entries(torch.tensor([5, 0]), torch.tensor([-1.5, 3.0]))
        >>> unpack_window_entries(entries)
        (tensor([5, 0], dtype=torch.int32), tensor([-1.5000,  3.0000]))
    """
    return round_to_bf16(values.float()).view(torch.int32) | indices.to(torch.int32)


def unpack_window_entries(entries: Tensor) -> tuple[Tensor, Tensor]:
    """``(indices int32, values fp32)`` of :func:`pack_window_entries`'s output (the values exactly bf16)."""
    return entries & _INDEX_MASK, (entries & _VALUE_MASK).view(torch.float32)
