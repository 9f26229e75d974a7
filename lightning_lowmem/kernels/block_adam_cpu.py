r"""The AdamMini/Eve update of fp32 tensors on CPUs: one C call per thread for a whole step.

The C kernel (``csrc/block_adam_rows.c``) takes each block of rows (a row, a head) once: it sums
:math:`g^2` over the block, which then stays in the L1/L2 cache, updates the block's second
moment, then the block's momentum and weights, so memory sees 20 bytes per parameter against
AdamW's 28. It also runs the elementwise (AdamW) update of ``full`` tensors, so that one call
serves all tensors of a step. The blocks of all tensors are split between
``torch.get_num_threads()`` threads by entry count; the C calls release the GIL, so the threads
run in parallel.

Example::

    >>> if rows_kernel_available():   # p, g, m: rows x cols fp32; v: one value per row
    ...     block_adam_rows_([p], [g], [m], [v], [None], [1], [False], decay=1.0, step_size=1e-3,
    ...                      bias_correction2_sqrt=0.03, beta1=0.9, beta2=0.999, eps=1e-8)
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_lowmem.kernels.native import Build, build_library

_FLOAT_BYTES = 4


class _Slice(NamedTuple):
    """Rows ``[start, stop)`` of item ``item`` (whole blocks)."""

    item: int
    start: int
    stop: int


_ABI = 4


@functools.cache
def rows_kernel_build() -> Build:
    """The build of the C kernel (built on first call, once per process; see :mod:`.native`)."""
    build = build_library("block_adam_rows")
    if build.library is not None and build.library.lowmem_block_adam_rows_abi() != _ABI:
        return build._replace(library=None, problem=f"{build.path} is not the kernel this package expects", failed=True)
    return build


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    lib = rows_kernel_build().library
    if lib is None:
        return None
    fn = lib.lowmem_block_adam_rows
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    fn.argtypes = [i64, *[ptr] * 9, f32, f32, f32, f32, f32, f32, f32, ctypes.c_int32]
    fn.restype = ctypes.c_int32
    return fn


def rows_kernel_available() -> bool:
    """Whether the C kernel could be built and loaded here (it is built on first call)."""
    return _kernel() is not None


def rows_kernel_supports(*tensors: Tensor) -> bool:
    """Whether tensors can take the kernel: on the CPU, fp32 and contiguous."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def block_adam_rows_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    row_denoms: list[Tensor | None],
    rows_per_block: list[int],
    transposed: list[bool],
    *,
    decay: float,
    step_size: float,
    bias_correction2_sqrt: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
) -> None:
    r"""One step of several 2-D fp32 tensors whose rows (or, ``transposed``, columns) are the rows
    of the blocks: contiguous, or for ``transposed`` a slice of columns of a contiguous matrix.

    Args:
        exp_avg_sqs: per tensor, one second moment per block, or (``rows_per_block`` 0) one per
            entry, or unused where ``row_denoms`` is given.
        row_denoms: per tensor, ``None``, or each row's :math:`\sqrt{\hat v} + \epsilon` when
            the caller has updated the second moments (then ``rows_per_block`` is 1).
        rows_per_block: per tensor, the rows of a block (consecutive rows), or 0 for the
            elementwise (AdamW) update.
        transposed: per tensor, whether its rows are the columns of the matrix (GPT-2 ``Conv1D``).
        decay: :math:`1 - \eta\lambda`; ``step_size`` and ``bias_correction2_sqrt`` as in
            :func:`lightning_lowmem.kernels.block_adam.adam_step_scalars`.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError(f"The C kernel block_adam_rows is not available here: {rows_kernel_build().problem}")
    items = list(zip(params, grads, exp_avgs, exp_avg_sqs, row_denoms, rows_per_block, transposed))
    shapes = [(*(p.shape[::-1] if t else p.shape), max(k, 1)) for p, k, t in zip(params, rows_per_block, transposed)]
    # 1 - beta in double, as torch.optim does: in fp32, 1 - 0.999 would be 1.3e-5 off
    scalars = (decay, step_size, bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2, eps, int(maximize))

    def run(share: list[_Slice]) -> None:
        if kernel(*_share_arguments(items, share), *scalars) != 0:
            raise MemoryError("The C kernel block_adam_rows could not allocate its scratch row.")

    run_on_threads(shapes, run)


def run_on_threads(shapes: list[tuple[int, int, int]], run: Callable[[list[_Slice]], None]) -> None:
    """Split the rows of ``shapes`` (``(rows, cols, rows per block)`` per item, blocks kept whole)
    between ``torch.get_num_threads()`` threads by entry count and call ``run(share)`` once per
    share, the first on this thread. The C kernels release the GIL, so the shares run in parallel;
    an error in any share is raised here after all have finished.
    """
    shares = _split_rows(shapes, torch.get_num_threads())
    if not shares:
        return
    pool = _pool(len(shares) - 1)
    futures = [pool.submit(run, share) for share in shares[1:]] if pool is not None else []
    try:
        run(shares[0])
    finally:
        for future in futures:
            future.result()


def _share_arguments(items: list[tuple], share: list[_Slice]) -> tuple:
    """The kernel's per-item pointer and size arrays for one thread's share of rows."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    n = len(share)
    p_ptrs, g_ptrs, m_ptrs, v_ptrs, d_ptrs = ((ptr * n)() for _ in range(5))
    rows, cols, blocks, strides = ((i64 * n)() for _ in range(4))
    for i, (item, start, stop) in enumerate(share):
        param, grad, exp_avg, exp_avg_sq, denom, rows_per_block, transposed = items[item]
        if transposed:  # rows are columns (of a matrix, or of a column slice of one)
            cols[i], strides[i] = param.shape[0], param.stride(0)
            offset = start * _FLOAT_BYTES
        else:
            cols[i] = param.shape[1]
            offset = start * cols[i] * _FLOAT_BYTES
        p_ptrs[i], g_ptrs[i], m_ptrs[i] = (t.data_ptr() + offset for t in (param, grad, exp_avg))
        if denom is not None:
            d_ptrs[i] = denom.data_ptr() + start * _FLOAT_BYTES
        elif rows_per_block == 0:
            v_ptrs[i] = exp_avg_sq.data_ptr() + offset
        else:
            v_ptrs[i] = exp_avg_sq.data_ptr() + start // rows_per_block * _FLOAT_BYTES
        rows[i], blocks[i] = stop - start, rows_per_block
    return n, p_ptrs, g_ptrs, m_ptrs, v_ptrs, d_ptrs, rows, cols, blocks, strides


def _split_rows(shapes: list[tuple[int, int, int]], n_threads: int) -> list[list[_Slice]]:
    """Split ``(rows, cols, rows per block)`` items into at most ``n_threads`` shares of about
    equal entry counts, cutting only between blocks."""
    total = sum(rows * cols for rows, cols, _ in shapes)
    n_threads = max(1, min(n_threads, total // (1 << 16) or 1))
    per_share = -(-total // n_threads)
    shares: list[list[_Slice]] = [[]]
    filled = 0
    for item, (rows, cols, rows_per_block) in enumerate(shapes):
        block = rows_per_block * cols
        start = 0
        while start < rows:
            blocks = max(1, -(-(per_share - filled) // block))
            stop = min(rows, start + blocks * rows_per_block)
            shares[-1].append(_Slice(item, start, stop))
            filled += (stop - start) * cols
            start = stop
            if filled >= per_share and len(shares) < n_threads:
                shares.append([])
                filled = 0
    return [share for share in shares if share]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor | None:
    if workers < 1:
        return None
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="lowmem-rows")
    return _POOLS[workers]
