"""The ``"native"`` implementation of the ``block_adam_quantized`` op: the C kernel for CPUs.

:func:`block_adam_quantized_native_` hands fp32 contiguous CPU parameters with bf16, int8 or int4
momentum to ``csrc/block_adam_quantized.c``: one pass per step that decodes each quantization
block, updates it and encodes it again (:mod:`.block_adam_quantized` is the math). Blocks of
consecutive rows (rows, heads, whole tensors) sum their ``g**2`` in the kernel; transposed GPT-2
``Conv1D`` rows, other block patterns and block means reduced across ranks get their denominators
computed here first. Rows are split between ``torch.get_num_threads()`` threads; the C calls
release the GIL. The other tensors (bf16 parameters, fp32-format momentum) go to ``rest``.

Example::

    >>> block_adam_quantized_native_(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats, seeds,
    ...     rest=block_adam_quantized_multi_update_, stochastic_rounding=False, lr=1e-3, step_size=1e-2,
    ...     bias_correction2_sqrt=0.03, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_lowmem.kernels.backends import Unavailable
from lightning_lowmem.kernels.block_adam import block_mean_sq, row_denominators_
from lightning_lowmem.kernels.block_adam_cpu import run_on_threads
from lightning_lowmem.kernels.block_adam_native import block_segments
from lightning_lowmem.kernels.layout import RowLayout, as_rows
from lightning_lowmem.kernels.momentum_formats import INT4_CODE_BOOK, INT4_MIDPOINTS, MomentumFormat, QuantizedMomentum
from lightning_lowmem.kernels.native import Build, build_library

_ABI = 1
_FORMATS = {"bf16": 1, "int8": 2, "int4": 3}
#: entries per scratch block of bf16 momentum (it has no scales)
_BF16_CHUNK = 256
_MODE_ROW_DENOMS, _MODE_COL_DENOMS = -1, -2


@functools.cache
def quantized_kernel_build() -> Build:
    """The build of the C kernel (built on first call, once per process; see :mod:`.native`)."""
    build = build_library("block_adam_quantized")
    if build.library is not None and build.library.lowmem_block_adam_quantized_abi() != _ABI:
        return build._replace(library=None, problem=f"{build.path} is not the kernel this package expects", failed=True)
    return build


def quantized_kernel_unavailable() -> Unavailable | None:
    """Why the C kernel cannot run here, ``None`` where it can (the resolver's check)."""
    build = quantized_kernel_build()
    return None if build.library is not None else Unavailable(build.problem or "it did not load", build.failed)


@functools.cache
def _kernel() -> ctypes._CFuncPtr:
    fn = quantized_kernel_build().library.lowmem_block_adam_quantized
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
    fn.argtypes = [i64, *[ptr] * 11, *[f32] * 7, i32, i32, i64, ptr, ptr]
    fn.restype = i32
    return fn


@functools.cache
def _code_book() -> tuple[Tensor, Tensor]:
    """The int4 code book (16 entries: the padding code 15 decodes to 0) and its midpoints, fp32.

    Raises:
        RuntimeError: a book that is not symmetric about 0, which the kernel's encoding assumes (it
            compares ``|m|`` with the 7 positive midpoints).
    """
    book = torch.tensor(INT4_CODE_BOOK + (0.0,), dtype=torch.float32)
    mids = torch.tensor(INT4_MIDPOINTS, dtype=torch.float32)
    if not (len(INT4_CODE_BOOK) == 15 and torch.equal(mids, -mids.flip(0)) and book[7] == 0):
        raise RuntimeError("The C kernel block_adam_quantized needs a symmetric 15-value int4 code book.")
    return book, mids


def _takes(param: Tensor, grad: Tensor, exp_avg: QuantizedMomentum, exp_avg_sq: Tensor, fmt: MomentumFormat) -> bool:
    tensors = (param, grad, exp_avg.codes, exp_avg_sq) + (() if exp_avg.scales is None else (exp_avg.scales,))
    return (fmt.name in _FORMATS and param.dtype == grad.dtype == exp_avg_sq.dtype == torch.float32
            and param.numel() > 0 and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def block_adam_quantized_native_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[QuantizedMomentum],
                                 exp_avg_sqs: list[Tensor], layouts: list[RowLayout], mean_sqs: list[Tensor | None],
                                 formats: list[MomentumFormat], seeds: list[int], *, rest: Callable[..., None],
                                 stochastic_rounding: bool, index_bases: list[int] | None = None,
                                 **hparams: Any) -> None:
    r"""Update the tensors the C kernel takes, one kernel call per format, and hand the others to ``rest``.

    ``index_bases[i]``: the global flat index of the first entry of ``params[i]`` (default 0); entry
    :math:`j` draws the random bits of index :math:`\mathrm{index\_bases}[i] + j` (the C kernel's
    per-item ``index_bases`` are this plus the item's first row times its columns)."""
    if index_bases is None:
        index_bases = [0] * len(params)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats, seeds, index_bases)
    others: list[int] = []
    by_format: dict[MomentumFormat, list[tuple]] = {}
    for k, (param, grad, exp_avg, exp_avg_sq, layout, mean_sq, fmt, seed, base) in enumerate(zip(*tensors)):
        if not _takes(param, grad, exp_avg, exp_avg_sq, fmt):
            others.append(k)
            continue
        by_format.setdefault(fmt, []).extend(_items(param, grad, exp_avg, exp_avg_sq, layout, mean_sq, seed, base,
                                                    hparams))
    for fmt, items in by_format.items():
        _run(fmt, items, hparams)
    if others:
        *lists, bases = ([x[k] for k in others] for x in tensors)
        rest(*lists, stochastic_rounding=stochastic_rounding, index_bases=bases, **hparams)


def _items(param: Tensor, grad: Tensor, exp_avg: QuantizedMomentum, exp_avg_sq: Tensor, layout: RowLayout,
           mean_sq: Tensor | None, seed: int, base: int, hparams: dict[str, Any]) -> list[tuple]:
    """The kernel's items of one tensor: ``(p, g, codes, scales, v, denom, mode, seed, global index of
    the first entry)`` over slices of its storage rows (``base``: that of the tensor's first entry)."""
    p, g = as_rows(param), as_rows(grad)
    codes, scales = exp_avg.codes.view(p.shape[0], -1), exp_avg.scales
    if layout.elementwise:
        return [(p, g, codes, scales, as_rows(exp_avg_sq), None, 0, seed, base)]
    if mean_sq is None and not layout.transposed:
        segments = [(0, p.shape[0], 1, 0)] if layout.group_index is None else block_segments(layout.group_index)
        if segments is not None:
            return [(p[a:b], g[a:b], codes[a:b], None if scales is None else scales[a:b],
                     exp_avg_sq[first : first + (b - a) // k], None, k, seed, base + a * p.shape[1])
                    for a, b, k, first in segments]
    if mean_sq is None:
        mean_sq = block_mean_sq(grad, layout)
    denom = row_denominators_(exp_avg_sq, mean_sq, layout, hparams["beta2"], hparams["bias_correction2_sqrt"],
                              hparams["eps"]).contiguous()
    return [(p, g, codes, scales, None, denom, _MODE_COL_DENOMS if layout.transposed else _MODE_ROW_DENOMS, seed,
             base)]


def _run(fmt: MomentumFormat, items: list[tuple], hparams: dict[str, Any]) -> None:
    shapes = [(p.shape[0], p.shape[1], max(mode, 1)) for p, _, _, _, _, _, mode, _, _ in items]
    book, mids = _code_book()
    lr, weight_decay = hparams["lr"], hparams["weight_decay"]
    scalars = (float(1 - lr * weight_decay), float(hparams["step_size"]), float(hparams["bias_correction2_sqrt"]),
               1 - hparams["beta1"], hparams["beta2"], 1 - hparams["beta2"], hparams["eps"], int(hparams["maximize"]),
               _FORMATS[fmt.name], fmt.block if fmt.quantized else _BF16_CHUNK, book.data_ptr(), mids.data_ptr())
    kernel = _kernel()

    def run(share: list) -> None:
        if kernel(*_share_arguments(items, share, fmt), *scalars) != 0:
            raise MemoryError("The C kernel block_adam_quantized could not allocate its scratch block.")

    run_on_threads(shapes, run)


def _share_arguments(items: list[tuple], share: list, fmt: MomentumFormat) -> tuple:
    """Per-slice pointer and size arrays for one thread's rows (whole blocks of rows)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    n = len(share)
    p_ptrs, g_ptrs, c_ptrs, s_ptrs, v_ptrs, d_ptrs = ((ptr * n)() for _ in range(6))
    rows, cols, modes, bases = ((i64 * n)() for _ in range(4))
    seeds = (ctypes.c_uint32 * n)()
    for i, (item, start, stop) in enumerate(share):
        p, g, codes, scales, v, denom, mode, seed, base = items[item]
        width = p.shape[1]
        p_ptrs[i], g_ptrs[i] = (t.data_ptr() + 4 * start * width for t in (p, g))
        c_ptrs[i] = codes.data_ptr() + start * codes.shape[1] * codes.element_size()
        if scales is not None:
            s_ptrs[i] = scales.data_ptr() + 4 * start * scales.shape[1]
        if mode == 0:
            v_ptrs[i] = v.data_ptr() + 4 * start * width
        elif mode > 0:
            v_ptrs[i] = v.data_ptr() + 4 * (start // mode)
        elif mode == _MODE_ROW_DENOMS:
            d_ptrs[i] = denom.data_ptr() + 4 * start
        else:
            d_ptrs[i] = denom.data_ptr()
        rows[i], cols[i], modes[i], seeds[i], bases[i] = stop - start, width, mode, seed & 0xFFFFFFFF, base + start * width
    return n, p_ptrs, g_ptrs, c_ptrs, s_ptrs, v_ptrs, d_ptrs, rows, cols, modes, bases, seeds
