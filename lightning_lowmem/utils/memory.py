"""Measure the memory an optimizer's state really holds.

Bytes are counted from the state tensors themselves (``numel * element_size``), with memory shared
by several tensors counted once: a view and its base, two state entries that are the same tensor, or
slices of one flat buffer each count their own bytes and no more. For a ``DTensor`` the local shard
is counted, so the number is per rank.

Example::

    >>> optimizer.step()
    >>> optimizer_state_bytes(optimizer) / optimizer_param_count(optimizer)   # bytes per parameter
    4.0
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` on this rank, each piece of memory once.

    Tensors nested in lists, tuples and dicts of a parameter's state are included; Python numbers
    are not. Meta tensors count ``numel * element_size`` each (they share no real memory).
    """
    return tensors_bytes(state_tensors(list(optimizer.state.values())))


def optimizer_param_count(optimizer: Optimizer) -> int:
    """Elements of the parameters the optimizer updates, a parameter in several groups counted once.

    For a ``DTensor`` parameter the local shard is counted, matching :func:`optimizer_state_bytes`.
    """
    params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    return sum(_local(p).numel() for p in params.values())


def tensors_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes of the memory the tensors cover, counting memory shared between them once.

    Every tensor covers the bytes from its first to its last element in its storage; the covered
    ranges of tensors on the same storage are merged before they are summed.
    """
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
    total = 0
    for tensor in tensors:
        tensor = _local(tensor)
        if tensor.numel() == 0:
            continue
        if tensor.device.type == "meta":
            total += tensor.numel() * tensor.element_size()
            continue
        size = tensor.element_size()
        start = tensor.storage_offset() * size
        span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        ranges.setdefault(key, []).append((start, start + span * size))
    for spans in ranges.values():
        total += _union_length(spans)
    return total


def _union_length(spans: list[tuple[int, int]]) -> int:
    """Length of the union of half-open ``[start, end)`` ranges."""
    total, reached = 0, None
    for start, end in sorted(spans):
        if reached is None or start >= reached:
            total += end - start
            reached = end
        elif end > reached:
            total += end - reached
            reached = end
    return total


def state_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj`` (an optimizer's per-parameter state), descending into mappings, lists and
    tuples, and into the inner tensors of wrapper tensor subclasses (torchao's 8-bit and 4-bit
    optimizer states keep their codes and scales there, with no storage of their own)."""
    if isinstance(obj, torch.Tensor) and is_traceable_wrapper_subclass(obj) and _local(obj) is obj:  # not a DTensor
        names, _ = obj.__tensor_flatten__()
        for name in names:
            yield from state_tensors(getattr(obj, name))
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from state_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from state_tensors(value)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor``; any other tensor as it is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.to_local()
    return tensor
