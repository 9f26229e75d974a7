r"""MicroAdam's 4-bit error feedback: per-bucket min/max quantisation of the residual, two codes per byte.

Within each row, buckets of ``quant_bucket`` coordinates (a row's last bucket may be shorter) are
quantised as :math:`\mathrm{round}\big((r - \min_q r) / \tfrac{\max_q r - \min_q r}{15}\big)`
with :math:`\mathrm{round}(x) = \lfloor x + 1/2 \rfloor` clamped to ``[0, 15]``, and read back as
:math:`\mathrm{deq}(c) = \min_q + c\,(\max_q-\min_q)/15`. Column ``2i`` of a row is in the low
nibble of its byte, ``2i+1`` in the high one. A bucket whose max equals its min stores code 0 (it
dequantises to the min exactly: no division by zero). The min and max are rounded to ``bfloat16``
before the codes are computed, so quantising and dequantising use the same numbers; the error of
one coordinate is then at most half a step, :math:`(\max_q-\min_q)/30`, plus the ``bfloat16``
rounding of the min/max (:math:`\le 2^{-9}` of their magnitude).

Example::

    >>> packed, lo, hi = quantize_4bit(torch.tensor([[0.0, 1.0, 0.6, 0.25]]), bucket=4)
    >>> dequantize_4bit(packed, lo, hi, cols=4, bucket=4)
    tensor([[0.0000, 1.0000, 0.6000, 0.2667]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lowmem.kernels.micro_adam_layout import QUANT_LEVELS, MicroAdamLayout
from lightning_lowmem.kernels.micro_adam_packing import round_to_bf16


def _row_buckets(x: Tensor, bucket: int) -> list[Tensor]:
    """``x`` (``rows x cols``) as ``[rows, buckets, bucket]`` of its whole buckets, then ``[rows, 1, rest]``
    for each row's shorter last bucket if there is one.

    Split rather than padded: Inductor (torch 2.13, CPU) miscompiles padding each row with copies of
    its last value when the padded tensor is fused with its producer (the padding reads garbage).
    """
    rows, cols = x.shape
    split = cols - cols % bucket
    parts = []
    if split:
        parts.append(x[:, :split].reshape(rows, split // bucket, bucket))
    if split < cols:
        parts.append(x[:, split:].unsqueeze(1))
    return parts


def _cat_columns(parts: list[Tensor]) -> Tensor:
    """``[rows, n_i, m_i]`` parts as one ``[rows, sum(n_i m_i)]`` tensor."""
    flat = [part.reshape(part.shape[0], -1) for part in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def quantize_4bit(x: Tensor, bucket: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-bucket 4-bit codes of ``x`` (``rows x cols``, fp32), two per byte, and each bucket's min/max.

    Buckets are taken within each row (a row's last bucket may be shorter);
    ``lo, hi = bf16(min_q x), bf16(max_q x)``;
    ``code = clamp(floor((x - lo) / ((hi - lo) / 15) + 1/2), 0, 15)``, 0 where ``hi == lo``.
    Returns uint8 ``[rows, ceil(cols/2)]`` (an odd row's last byte holds one code) and bf16
    ``[rows, ceil(cols/bucket)]`` twice.

    Example::

        >>> packed, lo, hi = quantize_4bit(torch.tensor([[0.0, 1.0, 0.6, 0.2, 0.5]]), bucket=4)
        >>> packed.tolist(), lo.tolist(), hi.tolist()  # codes 0, 15, 9, 3 | 0 (one-element bucket)
        ([[240, 57, 0]], [[0.0, 0.5]], [[1.0, 0.5]])
    """
    codes, lows, highs = [], [], []
    for buckets in _row_buckets(x, bucket):
        lo_f = round_to_bf16(buckets.amin(dim=2, keepdim=True))
        hi_f = round_to_bf16(buckets.amax(dim=2, keepdim=True))
        scale = (hi_f - lo_f) / QUANT_LEVELS
        nonzero = scale > 0
        q = torch.where(nonzero, (buckets - lo_f) / torch.where(nonzero, scale, 1.0), 0.0)
        codes.append((q + 0.5).clamp(0.0, QUANT_LEVELS + 0.5).to(torch.uint8))
        lows.append(lo_f)
        highs.append(hi_f)
    code = _cat_columns(codes)
    cols = code.shape[1]
    even = cols - cols % 2
    packed = code[:, 0:even:2] | (code[:, 1:even:2] << 4)
    if even < cols:  # the row's last code alone in its byte
        packed = torch.cat((packed, code[:, even:]), dim=1)
    return packed, _cat_columns(lows).to(torch.bfloat16), _cat_columns(highs).to(torch.bfloat16)


def dequantize_4bit(packed: Tensor, lo: Tensor, hi: Tensor, cols: int, bucket: int) -> Tensor:
    r"""The fp32 ``rows x cols`` values of :func:`quantize_4bit`'s output: ``lo + code * (hi - lo) / 15``.

    Example::

        >>> dequantize_4bit(*quantize_4bit(torch.tensor([[0.0, 1.0, 0.6, 0.25]]), 4), cols=4, bucket=4)
        tensor([[0.0000, 1.0000, 0.6000, 0.2667]])
    """
    rows = packed.shape[0]
    codes = torch.stack((packed & 15, packed >> 4), dim=2).view(rows, -1)[:, :cols].float()
    lo_f, hi_f = lo.float().unsqueeze(2), hi.float().unsqueeze(2)
    scale = (hi_f - lo_f) / QUANT_LEVELS
    values, first = [], 0
    for part in _row_buckets(codes, bucket):
        n = part.shape[1]
        values.append(lo_f[:, first : first + n] + part * scale[:, first : first + n])
        first += n
    return _cat_columns(values)


def dequantize_add(grad: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> Tensor:
    """Step 1, ``a = g + deq(e)``: a new contiguous fp32 ``rows x cols`` tensor (``grad`` is ``rows x cols``)."""
    return grad.float() + dequantize_4bit(error, error_min, error_max, layout.cols, layout.quant_bucket)


def quantize_into_(residual: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> None:
    """Step 4: quantise ``residual`` (fp32, ``rows x cols``) into the error-feedback state, in place."""
    packed, lo, hi = quantize_4bit(residual, layout.quant_bucket)
    error.copy_(packed)
    error_min.copy_(lo)
    error_max.copy_(hi)
