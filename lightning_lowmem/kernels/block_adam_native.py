"""The ``"native"`` implementation of the block-Adam op: the C kernel for the CPU tensors it takes.

:func:`block_adam_native_` hands every fp32 tensor of a step to
:func:`lightning_lowmem.kernels.block_adam_cpu.block_adam_rows_` in one call: rows, and blocks of
consecutive rows (heads, whole tensors, the segments of a fused QKV found by
:func:`block_segments`) as they are, GPT-2's transposed ``Conv1D`` weights as the matrix whose
columns are the rows, ``full`` tensors flat. Block means reduced across ranks (FSDP2) update their
second moments here and pass each row's denominator. The tensors the kernel does not take (bf16,
fp16, fp64, non-contiguous) go to ``rest``, the implementation :func:`lightning_lowmem.kernels.resolve`
chose behind it.

Example::

    >>> block_adam_native_(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, rest=block_adam_multi_update_,
    ...                    lr=1e-3, step_size=1e-2, bias_correction2_sqrt=0.03, beta1=0.9, beta2=0.999,
    ...                    eps=1e-8, weight_decay=0.1, maximize=False)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_lowmem.kernels.block_adam import row_denominators_
from lightning_lowmem.kernels.block_adam_cpu import block_adam_rows_, rows_kernel_supports
from lightning_lowmem.kernels.layout import RowLayout, as_rows


def block_adam_native_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       layouts: list[RowLayout], mean_sqs: list[Tensor | None], *, rest: Callable[..., None],
                       lr: float | Tensor, step_size: float | Tensor, bias_correction2_sqrt: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
    """Update the tensors the C kernel takes (fp32, contiguous, on the CPU) and hand the others to ``rest``.

    Blocks of consecutive rows (rows, heads, tensors, segments of fused QKV) and ``full`` tensors
    go to the kernel as they are; tensors whose block means were reduced across ranks update their
    second moments here and pass each row's denominator.
    """
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs)
    others, items = [], []
    for k, (param, grad, exp_avg, exp_avg_sq, layout, mean_sq) in enumerate(zip(*tensors)):
        if param.numel() == 0:  # an empty shard: only block means reduced across ranks move its (replicated) v
            if mean_sq is not None and not layout.elementwise:
                row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps)
            continue
        if not rows_kernel_supports(param, grad, exp_avg, exp_avg_sq) or (layout.transposed and param.dim() != 2):
            others.append(k)
            continue
        if layout.elementwise:
            p, g, m, v = (x.view(1, -1) if x.dim() < 2 else as_rows(x) for x in (param, grad, exp_avg, exp_avg_sq))
            items.append((p, g, m, v, None, 0, False))
            continue
        # the kernel's views: rows, or for transposed rows the matrix itself (its columns are the rows)
        p, g, m = (x if layout.transposed else as_rows(x) for x in (param, grad, exp_avg))
        if mean_sq is not None:
            denom = row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps).contiguous()
            items.append((p, g, m, exp_avg_sq, denom, 1, layout.transposed))
            continue
        n_rows = p.shape[1] if layout.transposed else p.shape[0]
        segments = [(0, n_rows, 1, 0)] if layout.group_index is None else block_segments(layout.group_index)
        if segments is None:
            others.append(k)
            continue
        for start, stop, rows_per_block, first_block in segments:
            n_blocks = (stop - start) // rows_per_block
            rows = (slice(None), slice(start, stop)) if layout.transposed else slice(start, stop)
            items.append((p[rows], g[rows], m[rows], exp_avg_sq[first_block : first_block + n_blocks], None,
                          rows_per_block, layout.transposed))
    if items:
        block_adam_rows_(*map(list, zip(*items)), decay=float(1 - lr * weight_decay), step_size=float(step_size),
                         bias_correction2_sqrt=bias_correction2_sqrt, beta1=beta1, beta2=beta2, eps=eps,
                         maximize=maximize)
    if others:
        rest(*([x[k] for k in others] for x in tensors), lr=lr, step_size=step_size,
             bias_correction2_sqrt=bias_correction2_sqrt, beta1=beta1, beta2=beta2, eps=eps,
             weight_decay=weight_decay, maximize=maximize)


#: id(group_index) -> (a weak reference to it, its segments); an entry leaves with its tensor.
_SEGMENTS: dict[int, tuple[weakref.ref, list[tuple[int, int, int, int]] | None]] = {}


def block_segments(group_index: Tensor) -> list[tuple[int, int, int, int]] | None:
    """Runs of equal blocks in a ``group_index`` (block of each row), as ``(start row, stop row,
    rows per block, first block)``; ``None`` if the blocks are not consecutive runs of rows
    numbered in order (the general case, left to the other backends).

    Example: heads of 2 rows then 3 single rows, ``[0, 0, 1, 1, 2, 3, 4]`` ->
    ``[(0, 4, 2, 0), (4, 7, 1, 2)]``.
    """
    key = id(group_index)
    cached = _SEGMENTS.get(key)
    if cached is not None and cached[0]() is group_index:
        return cached[1]
    blocks, counts = torch.unique_consecutive(group_index.cpu(), return_counts=True)
    segments: list[tuple[int, int, int, int]] | None = []
    if blocks.tolist() != list(range(len(blocks))):
        segments = None
    else:
        row = 0
        for block, count in enumerate(counts.tolist()):
            if segments and segments[-1][2] == count:
                start, _, _, first = segments[-1]
                segments[-1] = (start, row + count, count, first)
            else:
                segments.append((row, row + count, count, block))
            row += count
    _SEGMENTS[key] = (weakref.ref(group_index, lambda _, key=key: _SEGMENTS.pop(key, None)), segments)
    return segments
