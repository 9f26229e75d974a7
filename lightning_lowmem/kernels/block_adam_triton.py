"""Triton kernels of the block-Adam update (AdamMini, Eve) and their launchers.

The kernels compute in fp32 (``1 - beta`` comes computed in double on the host, as torch.optim
does: in fp32, ``1 - 0.999`` is 1.3e-5 off) and store in the tensors' own dtypes (bf16 parameters with fp32 state
work). Per step and entry they read ``p, g, m`` and write ``p, m`` (20 bytes for fp32), plus ``v``
for elementwise blocks (28 bytes, AdamW):

* :func:`adam_elementwise_` -- ``full`` blocks: AdamW, one pass over flat contiguous tensors;
* :func:`adam_rows_` -- a ``rows x cols`` view (any strides, so GPT-2's transposed ``Conv1D``
  weights need no copy). With one block per row it computes the row means of ``g**2``, updates
  ``v`` and applies the update in the same program, so ``g`` is read from memory once; otherwise
  the caller passes the per-row denominator ``sqrt(v_hat) + eps`` of each row's block;
* :func:`adam_small_tensors_` -- many small tensors (biases, norms) in one launch, one program per
  tensor, each either ``full`` (AdamW) or one block (a ``tensor`` spec): the launch reads the
  tensors' addresses from a table instead of taking one launch per tiny tensor.

:func:`block_adam_multi_update_triton_` is the ``"triton"`` implementation of the ``block_adam`` op
(same signature and result as :func:`~lightning_lowmem.kernels.block_adam.block_adam_multi_update_`),
built from these launches. Importing this module imports ``triton``.

Example::

    >>> adam_rows_(p_rows, g_rows, m_rows, v, denom=None, lr=1e-3, step_size=1e-2,
    ...            bias_correction2_sqrt=0.03, beta1=0.9, beta2=0.999, eps=1e-8,
    ...            weight_decay=0.0, maximize=False, cols=768.0)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_lowmem.kernels.block_adam import block_adam_update_, block_mean_sq, row_denominators_
from lightning_lowmem.kernels.layout import RowLayout, as_rows
from lightning_lowmem.kernels.triton_common import store_rounded

_ELEMENTWISE_BLOCK = 1024
_MAX_BLOCK_COLS = 1024
_TILE = 4096  # entries per program and column chunk of the row kernel
#: Tensors up to this many entries can share a launch (one program each).
SMALL_TENSOR_NUMEL = 1 << 16
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adam_elementwise_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n,
    lr, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    p = p * (1.0 - lr * weight_decay)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p + (m / denom) * (-step_size)
    store_rounded(p_ptr + offs, p, mask)
    store_rounded(m_ptr + offs, m, mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _adam_rows_kernel(
    p_ptr, g_ptr, m_ptr, row_ptr,
    rows, cols, p_stride_r, p_stride_c, g_stride_r, g_stride_c, m_stride_r, m_stride_c,
    lr, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, cols_f,
    ROW_STATS: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    if ROW_STATS:
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (c < cols)[None, :]
            g = tl.load(g_ptr + r[:, None] * g_stride_r + c[None, :] * g_stride_c, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(g * g, axis=1)
        v = tl.load(row_ptr + r, mask=row_mask, other=0.0)  # row_ptr is v: one block per row
        v = v * beta2 + one_minus_beta2 * (acc / cols_f)
        tl.store(row_ptr + r, v, mask=row_mask)
        denom = tl.sqrt(v) / bc2_sqrt + eps
    else:
        denom = tl.load(row_ptr + r, mask=row_mask, other=1.0)  # row_ptr is each row's denominator
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (c < cols)[None, :]
        p_offs = r[:, None] * p_stride_r + c[None, :] * p_stride_c
        m_offs = r[:, None] * m_stride_r + c[None, :] * m_stride_c
        p = tl.load(p_ptr + p_offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + r[:, None] * g_stride_r + c[None, :] * g_stride_c, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + m_offs, mask=mask).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = p * (1.0 - lr * weight_decay)
        m = m + one_minus_beta1 * (g - m)
        p = p + (m / denom[:, None]) * (-step_size)
        store_rounded(p_ptr + p_offs, p, mask)
        store_rounded(m_ptr + m_offs, m, mask)


@triton.jit
def _adam_small_tensors_kernel(
    p_table, g_table, m_table, v_table, numel_table,
    lr, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ONE_BLOCK: tl.constexpr, MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    n = tl.load(numel_table + t)
    p_ptr = tl.load(p_table + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(g_table + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(m_table + t).to(tl.pointer_type(P_DTYPE))
    v_ptr = tl.load(v_table + t).to(tl.pointer_type(tl.float32))
    if ONE_BLOCK:  # one second moment for the tensor: its mean of g**2 first
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc += g * g
        v_block = tl.load(v_ptr) * beta2 + one_minus_beta2 * (tl.sum(acc, axis=0) / n.to(tl.float32))
        tl.store(v_ptr, v_block)
        block_denom = tl.sqrt(v_block) / bc2_sqrt + eps
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = p * (1.0 - lr * weight_decay)
        m = m + one_minus_beta1 * (g - m)
        if ONE_BLOCK:
            denom = block_denom
        else:
            v = tl.load(v_ptr + offs, mask=mask) * beta2 + one_minus_beta2 * g * g
            tl.store(v_ptr + offs, v, mask=mask)
            denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p + (m / denom) * (-step_size)
        store_rounded(p_ptr + offs, p, mask)
        store_rounded(m_ptr + offs, m, mask)


def adam_elementwise_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, step_size: float, bias_correction2_sqrt: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
) -> None:
    """AdamW on contiguous tensors of one shape, in place (``v`` fp32)."""
    n = p.numel()
    grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
    _adam_elementwise_kernel[grid](
        p, g, m, v, n, lr, step_size, bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
        MAXIMIZE=maximize, BLOCK=_ELEMENTWISE_BLOCK,
    )


def adam_rows_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor | None, *, denom: Tensor | None, lr: float, step_size: float,
    bias_correction2_sqrt: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    cols: float,
) -> None:
    """The update of ``rows x cols`` views ``p, g, m``, in place.

    With ``denom=None`` every row is its own block: ``v`` (``[rows]``, fp32) is updated from the
    row means of ``g**2`` (``cols`` entries per row). Otherwise ``denom`` (``[rows]``) is each row's
    ``sqrt(v_hat) + eps`` and ``v`` is not touched.
    """
    rows, ncols = p.shape
    block_c = min(triton.next_power_of_2(max(ncols, 1)), _MAX_BLOCK_COLS)
    block_r = max(1, min(_TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    grid = (triton.cdiv(rows, block_r),)
    row_stats = denom is None
    _adam_rows_kernel[grid](
        p, g, m, v if row_stats else denom,
        rows, ncols, p.stride(0), p.stride(1), g.stride(0), g.stride(1), m.stride(0), m.stride(1),
        lr, step_size, bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, cols,
        ROW_STATS=row_stats, MAXIMIZE=maximize, BLOCK_R=block_r, BLOCK_C=block_c,
    )


def adam_small_tensors_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
    one_block: bool, lr: float, step_size: float, bias_correction2_sqrt: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, maximize: bool,
) -> None:
    """The update of contiguous small tensors in one launch, in place: AdamW (``v`` like ``p``) or,
    with ``one_block``, one second moment per tensor (``v`` of one entry). All ``params`` (and
    ``exp_avgs``) share a dtype, all ``grads`` share one, ``v`` is fp32."""
    device = params[0].device
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)
              for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
    _adam_small_tensors_kernel[(len(params),)](
        *tables, numels, lr, step_size, bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
        P_DTYPE=_TRITON_DTYPES[params[0].dtype], G_DTYPE=_TRITON_DTYPES[grads[0].dtype], ONE_BLOCK=one_block,
        MAXIMIZE=maximize, BLOCK=_ELEMENTWISE_BLOCK,
    )


def block_adam_update_triton_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    layout: RowLayout,
    lr: float,
    step_size: float,
    bias_correction2_sqrt: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    mean_sq: Tensor | None = None,
) -> None:
    """:func:`~lightning_lowmem.kernels.block_adam.block_adam_update_` as Triton kernels (same
    signature and result).

    ``full`` tensors take one elementwise pass; tensors with one block per row take one pass that
    also computes the row means of ``g**2``; other blocks (heads, tensors, fused segments, or block
    means reduced across ranks) update their few second moments here and pass the per-row
    denominators to the same row kernel. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    scalars = dict(lr=float(lr), step_size=float(step_size), bias_correction2_sqrt=float(bias_correction2_sqrt),
                   beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
    if layout.elementwise:
        if not (param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
            block_adam_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, mean_sq=mean_sq, **scalars)
            return
        adam_elementwise_(param, grad.contiguous(), exp_avg, exp_avg_sq, **scalars)
        return
    p, g, m = (as_rows(t, layout.transposed) for t in (param, grad, exp_avg))
    if layout.group_index is None and mean_sq is None:
        adam_rows_(p, g, m, exp_avg_sq, denom=None, cols=float(layout.group_numel), **scalars)
        return
    if mean_sq is None:
        mean_sq = block_mean_sq(grad, layout)
    denom = row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps)
    adam_rows_(p, g, m, None, denom=denom.contiguous(), cols=float(p.shape[1]), **scalars)


def block_adam_multi_update_triton_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    layouts: list[RowLayout],
    mean_sqs: list[Tensor | None],
    **hparams: object,
) -> None:
    """The ``"triton"`` implementation of the ``block_adam`` op: small ``full`` and one-block
    tensors (biases, norms) share one launch per kind and dtype; the others take
    :func:`block_adam_update_triton_` each."""
    small: dict[tuple[bool, torch.dtype, torch.dtype], list[int]] = {}
    for i, (param, grad, exp_avg, exp_avg_sq, layout, mean_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs)):
        one_block = _small_tensor_kind(param, grad, exp_avg, exp_avg_sq, layout, mean_sq)
        if one_block is None:
            block_adam_update_triton_(param, grad, exp_avg, exp_avg_sq, layout=layout, mean_sq=mean_sq, **hparams)
        else:
            small.setdefault((one_block, param.dtype, grad.dtype), []).append(i)
    scalars = {k: float(v) if k in ("lr", "step_size", "bias_correction2_sqrt") else v for k, v in hparams.items()}
    for (one_block, _, _), group in small.items():
        adam_small_tensors_(*([x[i] for i in group] for x in (params, grads, exp_avgs, exp_avg_sqs)),
                            one_block=one_block, **scalars)


def _small_tensor_kind(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, layout: RowLayout,
                       mean_sq: Tensor | None) -> bool | None:
    """For a tensor that can share the small-tensor launch, whether it is one block (else ``full``);
    ``None`` for the others."""
    if (param.numel() > SMALL_TENSOR_NUMEL or mean_sq is not None or param.dtype not in _TRITON_DTYPES
            or grad.dtype not in _TRITON_DTYPES or exp_avg.dtype != param.dtype or exp_avg_sq.dtype != torch.float32
            or not all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))):
        return None
    if layout.elementwise:
        return False
    one_block = isinstance(layout.group_numel, Tensor) and layout.group_numel.numel() == 1
    return True if one_block else None
