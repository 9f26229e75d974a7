r"""The block-Adam update (AdamMini, Eve) in PyTorch: the reference every backend must reproduce.

For a parameter viewed as rows (:func:`~lightning_lowmem.kernels.layout.as_rows`) whose rows are
grouped into blocks :math:`b`, one step :math:`t` with gradient :math:`g` is

.. math::

    \theta &\leftarrow \theta\,(1 - \eta\lambda)                                   \\
    m &\leftarrow \beta_1 m + (1-\beta_1)\, g                                     \\
    v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\, \tfrac{1}{|b|}\textstyle\sum_{i\in b} g_i^2 \\
    \theta_i &\leftarrow \theta_i - \frac{\eta}{1-\beta_1^t}\,
        \frac{m_i}{\sqrt{v_{b(i)} / (1-\beta_2^t)} + \epsilon}

With every block a single entry (``full``) the eager update runs the operations of
``torch.optim.AdamW``'s single-tensor path in the same order, so fp32 results are bit-for-bit
equal, with no temporary beyond the denominator AdamW also allocates.

:func:`block_adam_update_` updates one tensor; :func:`block_adam_multi_update_` (a list) is the
``"torch"`` implementation of the ``block_adam`` op and :func:`block_adam_compiled_` the
``"compile"`` one (see :func:`lightning_lowmem.kernels.resolve`).

Example::

    >>> p, g = torch.randn(4, 3), torch.randn(4, 3)
    >>> m, v = torch.zeros(4, 3), torch.zeros(4)
    >>> step_size, bias_correction2_sqrt = adam_step_scalars(1, lr=1e-3, beta1=0.9, beta2=0.999)
    >>> block_adam_update_(p, g, m, v, layout=RowLayout(elementwise=False, group_numel=3.0), lr=1e-3,
    ...                    step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt,
    ...                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_lowmem.kernels.compiled import compiled
from lightning_lowmem.kernels.layout import RowLayout, as_rows, state_dtype


def block_mean_sq(grad: Tensor, layout: RowLayout) -> Tensor:
    r"""Per-block mean of the squared gradient, :math:`\frac{1}{|b|}\sum_{i\in b} g_i^2`, as a 1-D tensor.

    Under sharding ``grad`` is the local shard, ``layout.group_index`` indexes its local rows and
    ``layout.group_numel`` holds global counts: the result is then a partial mean that sums to the
    global one across ranks.
    """
    rows = as_rows(grad, layout.transposed).to(state_dtype(grad))
    row_sq = rows.square().sum(dim=1)
    if layout.group_index is None:
        return row_sq / layout.group_numel
    if layout.group_numel.numel() == 1:  # one block (a 'tensor' spec): a plain sum
        return row_sq.sum(0, keepdim=True) / layout.group_numel
    sums = row_sq.new_zeros(layout.group_numel.numel()).index_add_(0, layout.group_index, row_sq)
    return sums / layout.group_numel


def adam_step_scalars(step: float, lr: float | Tensor, beta1: float, beta2: float) -> tuple[Any, float]:
    r"""``(step_size, bias_correction2_sqrt)`` of step ``step``: :math:`\eta/(1-\beta_1^t)` and :math:`\sqrt{1-\beta_2^t}`.

    Computed once per step outside the update (as ``torch.optim.AdamW`` computes them), so a
    compiled or native kernel loads two scalars instead of evaluating powers for every entry.
    """
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def row_denominators_(
    exp_avg_sq: Tensor, mean_sq: Tensor, layout: RowLayout, beta2: float, bias_correction2_sqrt: Tensor | float, eps: float
) -> Tensor:
    """Update the block second moments in place; return each row's ``sqrt(v_hat) + eps``."""
    exp_avg_sq.mul_(beta2).add_(mean_sq, alpha=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return denom if layout.group_index is None else denom[layout.group_index]


def block_adam_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    layout: RowLayout,
    lr: Tensor | float,
    step_size: Tensor | float,
    bias_correction2_sqrt: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    mean_sq: Tensor | None = None,
) -> None:
    """One in-place step of one tensor, with the step's scalars from :func:`adam_step_scalars`.

    Low-precision parameters and momenta are updated in the dtype of ``exp_avg_sq`` and written
    back. ``mean_sq`` overrides :func:`block_mean_sq` (for block means reduced across ranks).
    ``lr``, ``step_size`` and ``bias_correction2_sqrt`` may be Python numbers or 0-dim tensors (the
    compiled path passes tensors so that a new learning rate or step does not recompile).
    """
    compute = exp_avg_sq.dtype
    p = param if param.dtype == compute else param.to(compute)
    m = exp_avg if exp_avg.dtype == compute else exp_avg.to(compute)
    g = grad if grad.dtype == compute else grad.to(compute)
    if maximize:
        g = -g

    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    if layout.elementwise:  # torch.optim.AdamW's operations, in its order
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
    else:
        if mean_sq is None:
            mean_sq = block_mean_sq(g, layout)
        denom = row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps)
        row_scale = (-step_size / denom).unsqueeze(1)  # one division per row, not per entry
        as_rows(p, layout.transposed).addcmul_(as_rows(m, layout.transposed), row_scale)

    if p is not param:
        param.copy_(p)
    if m is not exp_avg:
        exp_avg.copy_(m)


def block_adam_multi_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    layouts: list[RowLayout],
    mean_sqs: list[Tensor | None],
    **hparams: Any,
) -> None:
    """:func:`block_adam_update_` over lists of tensors (``hparams``: its keyword arguments but
    ``layout`` and ``mean_sq``): the ``"torch"`` implementation of the ``block_adam`` op."""
    for param, grad, exp_avg, exp_avg_sq, layout, mean_sq in zip(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs):
        block_adam_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, mean_sq=mean_sq, **hparams)


#: Tensors under this many entries share compiled calls with like tensors: for them a call's
#: overhead (tens of microseconds) is the step's cost. Larger ones get a call each, so that one
#: small graph serves every tensor of their shape (a graph over many tensors compiles slowly).
GROUP_BELOW = 1 << 16


def block_adam_compiled_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    layouts: list[RowLayout],
    mean_sqs: list[Tensor | None],
    **hparams: Any,
) -> None:
    """:func:`block_adam_multi_update_` under ``torch.compile``: the ``"compile"`` implementation.

    The scalars go in as 0-dim tensors in the state's dtype (as eager ops cast Python scalars), so
    that a new step or learning rate does not recompile, and tensors as 2-D row views grouped by
    what a graph specializes on, so that one graph serves a kind of update whatever the ranks.
    """
    update = compiled(block_adam_multi_update_)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs)
    dtype = exp_avg_sqs[0].dtype if exp_avg_sqs else torch.float32
    for name in ("lr", "step_size", "bias_correction2_sqrt"):
        hparams[name] = torch.as_tensor(hparams[name], dtype=dtype)
    for group in _like_tensors(params, layouts, mean_sqs):
        update(*_row_views([[x[i] for i in group] for x in tensors]), **hparams)


def _like_tensors(params: list[Tensor], layouts: list[RowLayout], mean_sqs: list[Tensor | None]) -> list[list[int]]:
    """Indices grouped by what a compiled graph specializes on (shape, dtype, kind of layout);
    tensors of at least :data:`GROUP_BELOW` entries alone."""
    groups: dict[tuple, list[int]] = {}
    for i, (param, layout, mean_sq) in enumerate(zip(params, layouts, mean_sqs)):
        numel = layout.group_numel if isinstance(layout.group_numel, float) else None
        key = (param.shape, param.dtype, layout.transposed, layout.elementwise, layout.group_index is None,
               numel, mean_sq is None, i if param.numel() >= GROUP_BELOW else -1)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _row_views(tensors: list[list[Any]]) -> list[list[Any]]:
    """``params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs`` as 2-D row views, untransposed layouts."""
    params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs = tensors
    rows = [[as_rows(x, layout.transposed) for x in group] for group, layout in zip(zip(params, grads, exp_avgs), layouts)]
    exp_avg_sqs = [as_rows(v, layout.transposed) if layout.elementwise else v for v, layout in zip(exp_avg_sqs, layouts)]
    layouts = [layout._replace(transposed=False) for layout in layouts]
    return [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], exp_avg_sqs, layouts, mean_sqs]
