"""The Triton kernel of the ``block_adam_quantized`` op (AdamMini/Eve with bf16, int8 or int4 momentum).

One program per (storage row, quantization block): it decodes the block's momentum, updates the
parameter and the momentum in fp32 and encodes the block again (new scale and codes, or bf16 with
stochastic rounding), in one pass over memory; the math is in :mod:`.block_adam_quantized`. The
per-row denominators :math:`\\sqrt{\\hat v} + \\epsilon` of row-shared second moments are computed
before the launch (one small vector per tensor); ``full`` tensors update their elementwise ``v`` in
the kernel. bf16 parameters are written with stochastic rounding when asked, with the random bits
of the reference (:func:`~lightning_lowmem.kernels.momentum_formats.random_bits` of the global
flat index ``index_base + row * cols + c``).

:func:`block_adam_quantized_triton_` is the ``"triton"`` implementation (same signature and result
as :func:`~lightning_lowmem.kernels.block_adam_quantized.block_adam_quantized_multi_update_`).
Importing this module imports ``triton``.

Example::

    >>> block_adam_quantized_triton_([p], [g], [m], [v], [layout], [None], [MomentumFormat.of("int8")], [7],
    ...     stochastic_rounding=False, lr=1e-3, step_size=1e-2, bias_correction2_sqrt=0.03, beta1=0.9,
    ...     beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_lowmem.kernels.block_adam import block_mean_sq, row_denominators_
from lightning_lowmem.kernels.block_adam_quantized import PARAM_SEED_XOR
from lightning_lowmem.kernels.layout import RowLayout, as_rows
from lightning_lowmem.kernels.momentum_formats import (HASH_MUL1, HASH_MUL2, HASH_MUL3, INT4_CODE_BOOK,
                                                       INT4_MIDPOINTS, MomentumFormat, QuantizedMomentum)
from lightning_lowmem.kernels.triton_common import store_rounded

_MUL1, _MUL2, _MUL3 = tl.constexpr(HASH_MUL1), tl.constexpr(HASH_MUL2), tl.constexpr(HASH_MUL3)
_PARAM_SEED_XOR = tl.constexpr(PARAM_SEED_XOR)
_FORMATS = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}
_ELEMENTWISE, _ROW_DENOMS, _COL_DENOMS = 0, 1, 2
#: entries per program of the formats without scales (fp32, bf16)
_CHUNK = 1024


@triton.jit
def _random_bits(seed, index):
    h = index.to(tl.uint32) * _MUL1 + seed
    h = (h ^ (h >> 16)) * _MUL2
    h = (h ^ (h >> 15)) * _MUL3
    return h ^ (h >> 16)


@triton.jit
def _stochastic_bf16(x, seed, index):
    """fp32 ``x`` rounded to a bf16 value at random (as fp32, exact under ``.to(bf16)``)."""
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = tl.where(finite, bits + (_random_bits(seed, index) & 0xFFFF), bits) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _update_entries(p_ptr, g_ptr, v_ptr, d_ptr, row, c, mask, m, seed, index,
                    p_sr, p_sc, g_sr, g_sc, v_sr, v_sc,
                    decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                    SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr, ROUND_PARAM: tl.constexpr):
    """Update the momentum ``m`` (fp32) and the parameter entries ``c`` of ``row``; return the new ``m``."""
    p_ptrs = p_ptr + row * p_sr + c * p_sc
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + row * g_sr + c * g_sc, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    if SOURCE == 0:
        v_ptrs = v_ptr + row * v_sr + c * v_sc
        v = tl.load(v_ptrs, mask=mask)
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(v_ptrs, v, mask=mask)
        p = p + (m / (tl.sqrt(v) / bc2_sqrt + eps)) * (-step_size)
    elif SOURCE == 1:
        p = p + m * (-step_size / tl.load(d_ptr + row))
    else:
        p = p + m * (-step_size / tl.load(d_ptr + c, mask=mask, other=1.0))
    if ROUND_PARAM:
        tl.store(p_ptrs, _stochastic_bf16(p, seed ^ _PARAM_SEED_XOR, index).to(p_ptrs.dtype.element_ty), mask=mask)
    else:
        store_rounded(p_ptrs, p, mask)
    return m


@triton.jit
def _int4_codes(y, mids_ptr):
    """The nearest code book value's code: the count of midpoints below ``y``."""
    code = tl.zeros(y.shape, dtype=tl.int32)
    for k in tl.static_range(14):
        code += (y > tl.load(mids_ptr + k)).to(tl.int32)
    return code


@triton.jit
def _quantized_kernel(
    p_ptr, g_ptr, c_ptr, s_ptr, v_ptr, d_ptr, book_ptr, mids_ptr,
    cols, p_sr, p_sc, g_sr, g_sc, v_sr, v_sc, c_sr, s_sr, seed, index_base,
    decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
    FORMAT: tl.constexpr, SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr, ROUND_PARAM: tl.constexpr,
    QBLOCK: tl.constexpr, WIDTH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    c0 = block * QBLOCK
    first = index_base + row * cols  # the global flat index of the row's first entry
    end = tl.minimum(cols, c0 + QBLOCK)
    hp = (decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps)
    strides = (p_sr, p_sc, g_sr, g_sc, v_sr, v_sc)
    if FORMAT == 3:  # int4: even and odd columns, two codes a byte
        ce = c0 + 2 * tl.arange(0, WIDTH)
        co = ce + 1
        me, mo = ce < end, co < end
        byte_ptrs = c_ptr + row * c_sr + ce // 2
        codes = tl.load(byte_ptrs, mask=me, other=0).to(tl.int32)
        scale = tl.load(s_ptr + row * s_sr + block)
        m_e = tl.load(book_ptr + (codes & 15), mask=me, other=0.0) * scale
        m_o = tl.load(book_ptr + ((codes >> 4) & 15), mask=mo, other=0.0) * scale
        m_e = _update_entries(p_ptr, g_ptr, v_ptr, d_ptr, row, ce, me, m_e, seed, first + ce, *strides, *hp,
                              SOURCE, MAXIMIZE, ROUND_PARAM)
        m_o = _update_entries(p_ptr, g_ptr, v_ptr, d_ptr, row, co, mo, m_o, seed, first + co, *strides, *hp,
                              SOURCE, MAXIMIZE, ROUND_PARAM)
        m_e = tl.where(me, m_e, 0.0)
        m_o = tl.where(mo, m_o, 0.0)
        absmax = tl.maximum(tl.max(tl.abs(m_e), axis=0), tl.max(tl.abs(m_o), axis=0))
        inverse = tl.where(absmax > 0, 1.0 / absmax, 0.0)
        code_e = _int4_codes(m_e * inverse, mids_ptr)
        code_o = tl.where(mo, _int4_codes(m_o * inverse, mids_ptr), 7)
        tl.store(byte_ptrs, (code_e | (code_o << 4)).to(tl.uint8), mask=me)
        tl.store(s_ptr + row * s_sr + block, absmax)
    else:
        c = c0 + tl.arange(0, WIDTH)
        mask = c < end
        m_ptrs = c_ptr + row * c_sr + c
        if FORMAT == 2:
            scale = tl.load(s_ptr + row * s_sr + block)
            m = tl.load(m_ptrs, mask=mask, other=0).to(tl.float32) * scale
        else:
            m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        m = _update_entries(p_ptr, g_ptr, v_ptr, d_ptr, row, c, mask, m, seed, first + c, *strides, *hp,
                            SOURCE, MAXIMIZE, ROUND_PARAM)
        if FORMAT == 2:
            m = tl.where(mask, m, 0.0)
            absmax = tl.max(tl.abs(m), axis=0)
            inverse = tl.where(absmax > 0, 127.0 / absmax, 0.0)
            tl.store(m_ptrs, (tl.floor(m * inverse + 127.5) - 127.0).to(tl.int8), mask=mask)
            tl.store(s_ptr + row * s_sr + block, absmax / 127.0)
        elif FORMAT == 1:
            tl.store(m_ptrs, _stochastic_bf16(m, seed, first + c).to(tl.bfloat16), mask=mask)
        else:
            store_rounded(m_ptrs, m, mask)


@functools.cache
def _code_book(device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.tensor(INT4_CODE_BOOK + (0.0,), dtype=torch.float32, device=device),
            torch.tensor(INT4_MIDPOINTS, dtype=torch.float32, device=device))


def block_adam_quantized_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[QuantizedMomentum],
                                 exp_avg_sqs: list[Tensor], layouts: list[RowLayout], mean_sqs: list[Tensor | None],
                                 formats: list[MomentumFormat], seeds: list[int], *, stochastic_rounding: bool,
                                 index_bases: list[int] | None = None, **hparams: Any) -> None:
    r"""One launch per tensor (see the module docstring); entry :math:`j` (flat) of ``params[i]``
    draws the random bits of the global index :math:`\mathrm{index\_bases}[i] + j` (default base 0)."""
    if index_bases is None:
        index_bases = [0] * len(params)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats, seeds, index_bases):
        _update_tensor(*args, stochastic_rounding=stochastic_rounding, **hparams)


def _update_tensor(param: Tensor, grad: Tensor, exp_avg: QuantizedMomentum, exp_avg_sq: Tensor, layout: RowLayout,
                   mean_sq: Tensor | None, fmt: MomentumFormat, seed: int, index_base: int, *,
                   stochastic_rounding: bool, lr: Any,
                   step_size: Any, bias_correction2_sqrt: Any, beta1: float, beta2: float, eps: float,
                   weight_decay: float, maximize: bool) -> None:
    if param.numel() == 0:
        if mean_sq is not None and not layout.elementwise:
            row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps)
        return
    p, g = as_rows(param), as_rows(grad)
    rows, cols = p.shape
    codes = exp_avg.codes.view(rows, -1)
    scales = exp_avg.scales if exp_avg.scales is not None else codes  # unread without scales
    if layout.elementwise:
        v, denom, source = as_rows(exp_avg_sq), p, _ELEMENTWISE  # denom unread
    else:
        if mean_sq is None:
            mean_sq = block_mean_sq(grad, layout)
        denom = row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps).contiguous()
        v, source = p, _COL_DENOMS if layout.transposed else _ROW_DENOMS  # v unread
    qblock = fmt.block if fmt.quantized else _CHUNK
    width = triton.next_power_of_2(-(-qblock // 2) if fmt.name == "int4" else qblock)
    book, mids = _code_book(param.device)
    grid = (rows, -(-cols // qblock))
    _quantized_kernel[grid](
        p, g, codes, scales, v, denom, book, mids,
        cols, p.stride(0), p.stride(1), g.stride(0), g.stride(1), v.stride(0), v.stride(1), codes.stride(0),
        scales.stride(0), seed & 0xFFFFFFFF, index_base & 0xFFFFFFFF,  # the hash reads the index mod 2**32
        float(1 - lr * weight_decay), float(step_size), float(bias_correction2_sqrt), 1 - beta1, beta2, 1 - beta2, eps,
        FORMAT=_FORMATS[fmt.name], SOURCE=source, MAXIMIZE=bool(maximize),
        ROUND_PARAM=bool(stochastic_rounding and param.dtype == torch.bfloat16), QBLOCK=qblock, WIDTH=width,
    )
