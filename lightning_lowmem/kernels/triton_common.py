"""Triton helpers shared by the kernels: stores that round like PyTorch does."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), still as fp32: exact under ``.to(bf16)``.

    Done on the bits because Triton's interpreter truncates when it casts fp32 to bf16.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store_rounded(ptrs, x, mask):
    """Store fp32 ``x`` in the pointers' dtype, rounding to nearest for bf16 as ``Tensor.to`` does."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
