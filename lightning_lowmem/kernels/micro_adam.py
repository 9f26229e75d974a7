r"""MicroAdam's update of one tensor, in PyTorch: the reference every backend must reproduce.

One step :math:`t` (counted from 1) with gradient :math:`g`, for a tensor laid out as in
:mod:`~lightning_lowmem.kernels.micro_adam_layout`:

.. math::

    a &= g + \mathrm{deq}(e)                                              && \text{1. error feedback}\\
    I_b &= \operatorname{top-k}_{i \in b} |a_i|,\quad V_{(t-1) \bmod m} = a_I && \text{2. per-block top-k}\\
    r &= a \text{ with } a_I = 0                                           && \text{3. residual}\\
    e &= \mathrm{round}\big((r - \min_q r) / \tfrac{\max_q r - \min_q r}{15}\big) && \text{4. per bucket } q\\
    \theta &\leftarrow \theta (1 - \eta\lambda)                            && \text{5. weight decay}\\
    M &= \textstyle\sum_j \beta_1^{j} V_{(t-j)},\;\; S = \sum_j \beta_2^{j} V_{(t-j)}^2,\;\;
    u = \frac{c_1 M}{\sqrt{c_2 S} + \epsilon}                              && \text{6. } j < \min(t, m)\\
    \theta &\leftarrow \theta - \eta\, u                                   && \text{7.}

(quantisation in :mod:`~lightning_lowmem.kernels.micro_adam_error_feedback`, the window in
:mod:`~lightning_lowmem.kernels.micro_adam_window`). As in the paper, the selected coordinates
leave the error feedback whole: the ``bfloat16`` rounding of :math:`V` is not fed back. Without
error feedback (the three error tensors ``None``), step 1 is :math:`a = g` and steps 3-4 are
skipped: top-k window Adam.

Steps 1, 4 and 6-7 are the hot parts (:class:`HotParts`) a backend may replace; the rest is
shared. :func:`micro_adam_update_` is the ``"torch"`` implementation of the ``micro_adam`` op,
:func:`micro_adam_update_compiled_` the ``"compile"`` one and
:func:`lightning_lowmem.kernels.micro_adam_triton.micro_adam_update_triton_` the ``"triton"`` one.

Example::

    >>> layout = micro_adam_layout(16, 1000, block_size=256, density=0.02, quant_bucket=64)
    >>> p, g = torch.randn(16, 1000), torch.randn(16, 1000)
    >>> state = init_state(p, layout, window=4)
    >>> micro_adam_update_(p, g, *state, 1.0, layout=layout, lr=1e-3, beta1=0.9, beta2=0.999,
    ...                    eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_lowmem.kernels.compiled import compiled
from lightning_lowmem.kernels.micro_adam_error_feedback import dequantize_add, quantize_into_
from lightning_lowmem.kernels.micro_adam_layout import MicroAdamLayout, has_error_feedback
from lightning_lowmem.kernels.micro_adam_packing import pack_window_entries
from lightning_lowmem.kernels.micro_adam_window import (
    apply_window_update_,
    bias_factors,
    block_offsets,
    block_topk,
    newest_slot,
    window_ages,
    window_weights,
)


class HotParts(NamedTuple):
    """The three steps a backend may replace; everything else is shared."""

    dequantize_add: Callable[..., Tensor]
    quantize_into_: Callable[..., None]
    apply_window_update_: Callable[..., None]


#: The reference's hot parts.
TORCH_PARTS = HotParts(dequantize_add, quantize_into_, apply_window_update_)


def update_with_(
    parts: HotParts,
    param: Tensor,
    grad: Tensor,
    window: Tensor,
    error: Tensor | None,
    error_min: Tensor | None,
    error_max: Tensor | None,
    step: Tensor | float,
    layout: MicroAdamLayout,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The MicroAdam step of one tensor with ``parts`` doing the three hot steps (see the module docstring)."""
    if layout.rows == 0:  # a shard without rows (more ranks than rows)
        return
    device = param.device
    rows, cols = layout.rows, layout.cols
    g = grad.reshape(rows, cols)
    if maximize:
        g = -g
    feedback = has_error_feedback(error, error_min, error_max)
    if feedback:
        a = parts.dequantize_add(g, error, error_min, error_max, layout)  # 1.
    else:
        a = g.float()  # 1. without error feedback: a = g (only read, so it may be grad itself)
    rel, values = block_topk(a, layout)  # 2.
    ages = window_ages(step, window.shape[1], device)
    slot = newest_slot(step, window.shape[1], device)
    window.index_copy_(1, slot, pack_window_entries(rel, values).unsqueeze(1))
    if feedback:
        a.scatter_(1, rel + block_offsets(layout, device), 0.0)  # 3.
        parts.quantize_into_(a, error, error_min, error_max, layout)  # 4.

    param_rows = param.view(rows, cols) if param.is_contiguous() else param.reshape(rows, cols).clone()
    if weight_decay != 0:  # 5.
        param_rows.mul_(1 - lr * weight_decay)
    weights1, weights2 = window_weights(ages, beta1, beta2)
    c1, c2 = bias_factors(step, beta1, beta2)
    parts.apply_window_update_(param_rows, window, ages, weights1, weights2, c1, c2, eps, lr, layout)  # 6.-7.
    if not param.is_contiguous():
        param.copy_(param_rows.view_as(param))



def micro_adam_update_(
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
    """One in-place MicroAdam step of one tensor, pure PyTorch (``step`` already counts this step).

    ``param`` (fp32 or bf16; the update is computed in fp32) and ``grad`` hold ``layout.rows``
    rows of ``layout.cols`` coordinates (any shape with that many elements, rows first). The
    state (:func:`init_state`: ``window`` int32 ``[rows, m, K]``, ``error`` uint8
    ``[rows, ceil(cols/2)]``, ``error_min``/``error_max`` bf16 ``[rows, buckets]``) is updated in
    place, as is ``param``. ``lr`` and ``step`` may be Python numbers or 0-dim tensors (the
    compiled path passes tensors so nothing recompiles).

    ``error``, ``error_min`` and ``error_max`` all ``None`` switch error feedback off: steps 1, 3
    and 4 become :math:`a = g` (top-k of the gradient itself; nothing is fed back).

    Example::

        >>> layout = micro_adam_layout(1, 4, block_size=4, density=0.25)
        >>> p = torch.zeros(1, 4)
        >>> window, *_ = init_state(p, layout, 2, error_feedback=False)
        >>> micro_adam_update_(p, torch.tensor([[0.5, -2.0, 1.0, 0.0]]), window, None, None, None, 1.0,
        ...                    layout=layout, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0)
        >>> p  # step 1: sign(g) on the k = 1 largest |g|
        tensor([[0.0000, 0.1000, 0.0000, 0.0000]])
    """
    update_with_(TORCH_PARTS, param, grad, window, error, error_min, error_max, step,
            layout, lr, beta1, beta2, eps, weight_decay, maximize)



def micro_adam_update_compiled_(
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
    **hparams: Any,
) -> None:
    """:func:`micro_adam_update_` under ``torch.compile``: the ``"compile"`` implementation.

    ``step`` and ``lr`` go in as 0-dim tensors (fp32 step, fp64 lr) so that neither a new step nor
    a scheduled learning rate recompiles.
    """
    step = torch.as_tensor(step, dtype=torch.float32)
    lr = torch.as_tensor(lr, dtype=torch.float64)
    compiled(micro_adam_update_)(param, grad, window, error, error_min, error_max, step, layout=layout, lr=lr, **hparams)
