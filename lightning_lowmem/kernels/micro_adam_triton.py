r"""Triton kernels for MicroAdam's hot parts, and their launchers.

Each launcher has the signature and result of the PyTorch function of the same name in
:mod:`lightning_lowmem.kernels.micro_adam_error_feedback` or
:mod:`lightning_lowmem.kernels.micro_adam_window` (the reference; the row-aligned layout is in
:mod:`lightning_lowmem.kernels.micro_adam_layout`); tensors are ``rows x cols`` and every program works inside
one row:

* :func:`dequantize_add` -- ``a = g + lo + code * (hi - lo) / 15``, elementwise (grid: rows x
  column chunks);
* :func:`quantize_into_` -- per bucket of a row min/max (rounded to bf16), 4-bit codes, two per
  byte (grid: rows x bucket chunks);
* :func:`apply_window_update_` -- per block of a row, ``M``, ``S`` of every coordinate in the window
  and ``p -= lr * c1 M / (sqrt(c2 S) + eps)``, written once per coordinate (by its newest entry)
  (grid: rows x blocks).

:func:`micro_adam_update_triton_`, the ``"triton"`` implementation of the ``micro_adam`` op, is the
reference update with these three as its hot parts.

Rows are grid axis 0 (up to 2**31 - 1 programs), chunks and blocks axis 1 (up to 65535).
Divisions and square roots are the correctly rounded ones (``div_rn``, ``sqrt_rn``) so that the
kernels round like the reference. Importing this module imports ``triton``; with
``TRITON_INTERPRET=1`` set before ``triton`` is first imported, the kernels run on CPU tensors
(slowly, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_lowmem.kernels.triton_common import round_to_bf16
from lightning_lowmem.kernels.micro_adam import HotParts, update_with_
from lightning_lowmem.kernels.micro_adam_layout import QUANT_LEVELS, MicroAdamLayout

_MAX_ELEMENTS_PER_PROGRAM = 1024
_BUCKETS_PER_PROGRAM = 16
_QUERY_CHUNK = 32
_KEY_CHUNK = 256


@triton.jit
def _dequantize_add_kernel(
    grad_ptr, error_ptr, lo_ptr, hi_ptr, out_ptr, cols, packed_per_row, buckets_per_row,
    BUCKET: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < cols
    g = tl.load(grad_ptr + row * cols + col, mask=mask, other=0.0).to(tl.float32)
    byte = tl.load(error_ptr + row * packed_per_row + col // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((col % 2) * 4).to(tl.int32)) & 15
    bucket = row * buckets_per_row + col // BUCKET
    lo = tl.load(lo_ptr + bucket, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + bucket, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(hi - lo, LEVELS)
    tl.store(out_ptr + row * cols + col, g + (lo + code.to(tl.float32) * scale), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, error_ptr, lo_ptr, hi_ptr, cols, packed_per_row, buckets_per_row,
    BUCKET: tl.constexpr, HALF_P: tl.constexpr, LEVELS: tl.constexpr, BUCKETS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    buckets = tl.program_id(1).to(tl.int64) * BUCKETS + tl.arange(0, BUCKETS)  # within the row
    pair = tl.arange(0, HALF_P)
    bucket_ok = buckets < buckets_per_row
    valid = bucket_ok[:, None] & (pair < BUCKET // 2)[None, :]
    even = buckets[:, None] * BUCKET + 2 * pair[None, :]  # column of the pair's first code
    mask0 = valid & (even < cols)
    mask1 = valid & (even + 1 < cols)
    x0 = tl.load(x_ptr + row * cols + even, mask=mask0, other=0.0)
    x1 = tl.load(x_ptr + row * cols + even + 1, mask=mask1, other=0.0)
    lo = tl.minimum(tl.min(tl.where(mask0, x0, float("inf")), axis=1), tl.min(tl.where(mask1, x1, float("inf")), axis=1))
    hi = tl.maximum(tl.max(tl.where(mask0, x0, -float("inf")), axis=1), tl.max(tl.where(mask1, x1, -float("inf")), axis=1))
    lo = round_to_bf16(lo)
    hi = round_to_bf16(hi)
    tl.store(lo_ptr + row * buckets_per_row + buckets, lo.to(tl.bfloat16), mask=bucket_ok)
    tl.store(hi_ptr + row * buckets_per_row + buckets, hi.to(tl.bfloat16), mask=bucket_ok)
    lo_f = lo[:, None]
    scale = tl.math.div_rn(hi[:, None] - lo_f, LEVELS)
    nonzero = scale > 0
    safe = tl.where(nonzero, scale, 1.0)
    q0 = tl.where(nonzero, tl.math.div_rn(x0 - lo_f, safe), 0.0)
    q1 = tl.where(nonzero, tl.math.div_rn(x1 - lo_f, safe), 0.0)
    c0 = tl.minimum(tl.maximum(q0 + 0.5, 0.0), LEVELS + 0.5).to(tl.int32)
    c1 = tl.minimum(tl.maximum(q1 + 0.5, 0.0), LEVELS + 0.5).to(tl.int32)
    c1 = tl.where(mask1, c1, 0)
    byte = (c0 | (c1 << 4)).to(tl.uint8)
    # a byte exists where its first code does: ceil(cols / 2) bytes per row
    tl.store(error_ptr + row * packed_per_row + buckets[:, None] * (BUCKET // 2) + pair[None, :], byte, mask=mask0)


@triton.jit
def _window_update_kernel(
    param_ptr, window_ptr, age_ptr, w1_ptr, w2_ptr,
    cols, entries_per_slot, k, k_last, full_blocks, block_len, c1, c2, eps, lr,
    WINDOW: tl.constexpr, QUERY: tl.constexpr, KEYS: tl.constexpr, PARAM_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    kb = tl.where(block < full_blocks, k, k_last)
    entries = WINDOW * kb  # this block's entries over all ring slots
    window_row = window_ptr + row * WINDOW * entries_per_slot + block.to(tl.int64) * k
    param_block = param_ptr + row * cols + block.to(tl.int64) * block_len
    for q0 in tl.range(0, entries, QUERY):
        q = q0 + tl.arange(0, QUERY)
        q_slot = q // kb
        q_in = q < entries
        q_age = tl.load(age_ptr + q_slot, mask=q_in, other=WINDOW)
        q_ok = q_in & (q_age < WINDOW)
        q_entry = tl.load(window_row + q_slot * entries_per_slot + q % kb, mask=q_ok, other=0)
        q_idx = tl.where(q_ok, q_entry & 0xFFFF, -1)
        exp_sum = tl.zeros([QUERY], dtype=tl.float32)
        sq_sum = tl.zeros([QUERY], dtype=tl.float32)
        newest = tl.full([QUERY], WINDOW, dtype=tl.int32)
        for k0 in tl.range(0, entries, KEYS):
            e = k0 + tl.arange(0, KEYS)
            e_slot = e // kb
            e_in = e < entries
            e_age = tl.load(age_ptr + e_slot, mask=e_in, other=WINDOW)
            e_ok = e_in & (e_age < WINDOW)
            e_entry = tl.load(window_row + e_slot * entries_per_slot + e % kb, mask=e_ok, other=0)
            e_idx = tl.where(e_ok, e_entry & 0xFFFF, -2)
            e_val = (e_entry & -65536).to(tl.float32, bitcast=True)
            e_w1 = tl.load(w1_ptr + e_slot, mask=e_ok, other=0.0)
            e_w2 = tl.load(w2_ptr + e_slot, mask=e_ok, other=0.0)
            same = (q_idx[:, None] == e_idx[None, :]) & e_ok[None, :]
            exp_sum += tl.sum(tl.where(same, (e_val * e_w1)[None, :], 0.0), axis=1)
            sq_sum += tl.sum(tl.where(same, (e_val * e_val * e_w2)[None, :], 0.0), axis=1)
            newest = tl.minimum(newest, tl.min(tl.where(same, e_age[None, :], WINDOW), axis=1))
        writer = q_ok & (q_age == newest)
        denom = tl.sqrt_rn(sq_sum * c2) + eps
        nonzero = denom > 0
        update = tl.where(nonzero, tl.math.div_rn(exp_sum * c1, tl.where(nonzero, denom, 1.0)), 0.0)
        ptrs = param_block + q_idx
        p = tl.load(ptrs, mask=writer, other=0.0)
        new = p - lr * update
        if PARAM_BF16:
            new = round_to_bf16(new)
        tl.store(ptrs, new.to(p.dtype), mask=writer)


def _check_device(*tensors: Tensor) -> None:
    """CUDA tensors, or CPU tensors when Triton runs these kernels in its interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    if all(t.device.type == "cuda" for t in tensors):
        return
    ours, triton_lang = (isinstance(f, InterpretedFunction) for f in (_window_update_kernel, tl.max))
    if ours and triton_lang:
        return
    if ours:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after `triton` was imported, so triton.language runs compiled while "
            "these kernels are interpreted. Set it at the start of the process, before anything imports triton "
            "(importing lightning or torch._inductor does)."
        )
    device = next(t.device for t in tensors if t.device.type != "cuda")
    raise RuntimeError(
        f"MicroAdam's Triton kernels need CUDA tensors, got a tensor on {device}. Use backend 'auto', 'torch' or "
        "'compile' on this device, or set TRITON_INTERPRET=1 at the start of the process (before triton is "
        "imported) to run the kernels in Triton's slow interpreter."
    )


def _as_scalar(x: Tensor | float) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def dequantize_add(grad: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> Tensor:
    """``grad.float() + deq(error)`` as a new fp32 ``rows x cols`` tensor (``grad`` fp32 or bf16)."""
    _check_device(grad, error)
    grad = grad.contiguous()
    out = torch.empty(layout.rows, layout.cols, dtype=torch.float32, device=grad.device)
    block = min(_MAX_ELEMENTS_PER_PROGRAM, triton.next_power_of_2(layout.cols))
    _dequantize_add_kernel[(layout.rows, triton.cdiv(layout.cols, block))](
        grad, error, error_min, error_max, out, layout.cols, layout.packed_per_row, layout.buckets_per_row,
        BUCKET=layout.quant_bucket, LEVELS=float(QUANT_LEVELS), BLOCK=block,
    )
    return out


def quantize_into_(residual: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> None:
    """Quantise ``residual`` (fp32, contiguous ``rows x cols``) into ``error``/``error_min``/``error_max``."""
    _check_device(residual, error)
    buckets = min(_BUCKETS_PER_PROGRAM, triton.next_power_of_2(layout.buckets_per_row))
    _quantize_kernel[(layout.rows, triton.cdiv(layout.buckets_per_row, buckets))](
        residual, error, error_min, error_max, layout.cols, layout.packed_per_row, layout.buckets_per_row,
        BUCKET=layout.quant_bucket, HALF_P=triton.next_power_of_2(layout.quant_bucket // 2),
        LEVELS=float(QUANT_LEVELS), BUCKETS=buckets,
    )


def apply_window_update_(
    param_rows: Tensor,
    window: Tensor,
    ages: Tensor,
    weights1: Tensor,
    weights2: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
    eps: float,
    lr: Tensor | float,
    layout: MicroAdamLayout,
) -> None:
    """``param_rows -= lr * u`` at the coordinates in the window (one program per block of a row).

    ``param_rows`` is a contiguous ``rows x cols`` tensor, ``window`` the int32 ``[rows, m, K]`` ring.
    """
    _check_device(param_rows, window)
    _window_update_kernel[(layout.rows, layout.blocks_per_row)](
        param_rows, window, ages.to(torch.int32), weights1.float(), weights2.float(),
        layout.cols, layout.topk_per_row, layout.k, layout.k_last, layout.full_blocks, layout.block_len,
        _as_scalar(c1), _as_scalar(c2), float(eps), _as_scalar(lr),
        WINDOW=window.shape[1], QUERY=_QUERY_CHUNK, KEYS=_KEY_CHUNK,
        PARAM_BF16=param_rows.dtype == torch.bfloat16,
    )


#: The hot parts as Triton kernels.
TRITON_PARTS = HotParts(dequantize_add, quantize_into_, apply_window_update_)


def micro_adam_update_triton_(
    param: Tensor,
    grad: Tensor,
    window: Tensor,
    error: Tensor | None,
    error_min: Tensor | None,
    error_max: Tensor | None,
    step: Tensor | float,
    *,
    layout: MicroAdamLayout,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """:func:`~lightning_lowmem.kernels.micro_adam.micro_adam_update_` with its hot parts as Triton kernels (same signature and result).

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels
    were first imported. The top-k itself stays ``torch.topk``.
    """
    update_with_(TRITON_PARTS, param, grad, window, error, error_min, error_max, step,
            layout, lr, beta1, beta2, eps, weight_decay, maximize)
