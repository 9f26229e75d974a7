r"""The functional core of AdamMini and Eve: Adam with a second moment shared within blocks.

For a parameter viewed as rows (see :mod:`lightning_lowmem.partition.spec`) whose rows are grouped
into blocks :math:`b`, one step :math:`t` with gradient :math:`g` is

.. math::

    \theta &\leftarrow \theta\,(1 - \eta\lambda)                                   \\
    m &\leftarrow \beta_1 m + (1-\beta_1)\, g                                     \\
    v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\, \tfrac{1}{|b|}\textstyle\sum_{i\in b} g_i^2 \\
    \theta_i &\leftarrow \theta_i - \frac{\eta}{1-\beta_1^t}\,
        \frac{m_i}{\sqrt{v_{b(i)} / (1-\beta_2^t)} + \epsilon}

With every block a single entry (``full``) this is exactly ``torch.optim.AdamW``.

:func:`block_adam_update_` is the one pure update of one tensor; every backend runs it (eagerly,
or under ``torch.compile``), and a Triton kernel must have the same signature and result.
:func:`block_adam` is the functional API over lists of tensors.

Example::

    >>> p, g = torch.randn(4, 3), torch.randn(4, 3)
    >>> m, v = torch.zeros(4, 3), torch.zeros(4)
    >>> step_size, bias_correction2_sqrt = adam_step_scalars(1, lr=1e-3, beta1=0.9, beta2=0.999)
    >>> block_adam_update_(p, g, m, v, layout=RowLayout(elementwise=False, group_numel=3.0), lr=1e-3,
    ...                    step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt,
    ...                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_lowmem.kernels.dispatch import resolve_update, rows_kernel_wanted


class RowLayout(NamedTuple):
    """How a tensor is viewed as rows and how its rows share second moments.

    Args:
        transposed: the rows are dim 1 of a 2-D tensor (GPT-2 ``Conv1D``).
        elementwise: ``v`` has the tensor's shape (AdamW); the other fields are unused.
        group_index: for each row, the index of its block in ``v``; ``None`` when row ``r`` is
            block ``r``.
        group_numel: entries per block (a tensor of one value per block), or the column count
            when every row is its own block. Under sharding these are *global* counts, so a
            block's local sum divided by them is the local share of the global mean.
    """

    transposed: bool = False
    elementwise: bool = True
    group_index: Tensor | None = None
    group_numel: Tensor | float = 1.0


def as_rows(tensor: Tensor, transposed: bool = False) -> Tensor:
    """A ``rows x cols`` view of ``tensor`` (no copy): dim 0 against the rest, or ``.t()``."""
    if transposed:
        return tensor.t()
    if tensor.dim() == 0:
        return tensor.view(1, 1)
    return tensor.view(tensor.shape[0], -1)


def state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of second-moment state: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


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


def adam_step_scalars(step: float, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    r"""``(step_size, bias_correction2_sqrt)`` of step ``step``: :math:`\eta/(1-\beta_1^t)` and :math:`\sqrt{1-\beta_2^t}`.

    Computed once per step outside the update, so a compiled or Triton kernel loads two scalars
    instead of evaluating powers for every vector of entries.
    """
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


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
    g = grad.to(compute)
    if maximize:
        g = -g

    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    if layout.elementwise:
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.add_(m / denom * -step_size)
    else:
        if mean_sq is None:
            mean_sq = block_mean_sq(g, layout)
        denom = row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps)
        row_scale = (-step_size / denom).unsqueeze(1)  # one division per row, not per entry
        as_rows(p, layout.transposed).add_(as_rows(m, layout.transposed) * row_scale)

    if p is not param:
        param.copy_(p)
    if m is not exp_avg:
        exp_avg.copy_(m)


def row_denominators_(
    exp_avg_sq: Tensor, mean_sq: Tensor, layout: RowLayout, beta2: float, bias_correction2_sqrt: Tensor | float, eps: float
) -> Tensor:
    """Update the block second moments in place; return each row's ``sqrt(v_hat) + eps``."""
    exp_avg_sq.mul_(beta2).add_(mean_sq, alpha=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return denom if layout.group_index is None else denom[layout.group_index]


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
    """:func:`block_adam_update_` as Triton kernels (same signature and result).

    ``full`` tensors take one elementwise pass; tensors with one block per row take one pass that
    also computes the row means of ``g**2``; other blocks (heads, tensors, fused segments, or block
    means reduced across ranks) update their few second moments here and pass the per-row
    denominators to the same row kernel. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    from lightning_lowmem.kernels import block_adam_triton as kernels

    scalars = dict(lr=float(lr), step_size=float(step_size), bias_correction2_sqrt=float(bias_correction2_sqrt),
                   beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
    if layout.elementwise:
        if not (param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
            block_adam_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, mean_sq=mean_sq, **scalars)
            return
        kernels.adam_elementwise_(param, grad.contiguous(), exp_avg, exp_avg_sq, **scalars)
        return
    p, g, m = (as_rows(t, layout.transposed) for t in (param, grad, exp_avg))
    if layout.group_index is None and mean_sq is None:
        kernels.adam_rows_(p, g, m, exp_avg_sq, denom=None, cols=float(layout.group_numel), **scalars)
        return
    if mean_sq is None:
        mean_sq = block_mean_sq(grad, layout)
    denom = row_denominators_(exp_avg_sq, mean_sq, layout, beta2, bias_correction2_sqrt, eps)
    kernels.adam_rows_(p, g, m, None, denom=denom.contiguous(), cols=float(p.shape[1]), **scalars)


def block_adam_multi_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    layouts: list[RowLayout],
    mean_sqs: list[Tensor | None],
    **hparams: Any,
) -> None:
    """:func:`block_adam_update_` over lists of tensors: under ``torch.compile``, one graph (and
    one call) for a list of like tensors instead of one per tensor."""
    for param, grad, exp_avg, exp_avg_sq, layout, mean_sq in zip(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs):
        block_adam_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, mean_sq=mean_sq, **hparams)


def block_adam_multi_update_triton_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    layouts: list[RowLayout],
    mean_sqs: list[Tensor | None],
    **hparams: Any,
) -> None:
    """:func:`block_adam_multi_update_` as Triton kernels: small ``full`` and one-block tensors
    (biases, norms) share one launch per kind and dtype; the others take
    :func:`block_adam_update_triton_` each."""
    from lightning_lowmem.kernels import block_adam_triton as kernels

    small: dict[tuple[bool, torch.dtype, torch.dtype], list[int]] = {}
    for i, (param, grad, exp_avg, exp_avg_sq, layout, mean_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs)):
        one_block = _small_tensor_kind(param, grad, exp_avg, exp_avg_sq, layout, mean_sq)
        if one_block is None:
            block_adam_update_triton_(param, grad, exp_avg, exp_avg_sq, layout=layout, mean_sq=mean_sq, **hparams)
        else:
            small.setdefault((one_block, param.dtype, grad.dtype), []).append(i)
    scalars = {k: float(v) if k in ("lr", "step_size", "bias_correction2_sqrt") else v for k, v in hparams.items()}
    for (one_block, _, _), group in small.items():
        kernels.adam_small_tensors_(*([x[i] for i in group] for x in (params, grads, exp_avgs, exp_avg_sqs)),
                                    one_block=one_block, **scalars)


def _small_tensor_kind(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, layout: RowLayout,
                       mean_sq: Tensor | None) -> bool | None:
    """For a tensor that can share the small-tensor launch, whether it is one block (else ``full``);
    ``None`` for the others."""
    from lightning_lowmem.kernels.block_adam_triton import _TRITON_DTYPES, SMALL_TENSOR_NUMEL

    if (param.numel() > SMALL_TENSOR_NUMEL or mean_sq is not None or param.dtype not in _TRITON_DTYPES
            or grad.dtype not in _TRITON_DTYPES or exp_avg.dtype != param.dtype or exp_avg_sq.dtype != torch.float32
            or not all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))):
        return None
    if layout.elementwise:
        return False
    one_block = isinstance(layout.group_numel, Tensor) and layout.group_numel.numel() == 1
    return True if one_block else None


def block_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    layouts: list[RowLayout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    mean_sqs: list[Tensor | None] | None = None,
    backend: str = "torch",
) -> None:
    """Functional API: one step over lists of tensors (increments ``state_steps``).

    Args:
        backend: ``"torch"`` (eager reference), ``"compile"`` (``torch.compile`` of the same
            update, one graph per list of like tensors; falls back to eager with one warning where
            compilation fails), ``"triton"`` (:func:`block_adam_update_triton_`), ``"native"``
            (fp32 tensors on CPUs take the C kernel, see :mod:`lightning_lowmem.optim.native_rows`;
            the other tensors ``"compile"``) or
            ``"auto"`` (see :mod:`lightning_lowmem.kernels.dispatch`).
        mean_sqs: per tensor, an already reduced block mean of ``g**2`` or ``None``.
    """
    if not params:
        return
    if mean_sqs is None:
        mean_sqs = [None] * len(params)
    torch._foreach_add_(state_steps, 1)
    # tensors usually share a step; those that do share the step's scalars
    by_step: dict[tuple[float, torch.dtype], list[int]] = {}
    for i, step in enumerate(torch.stack(state_steps).tolist()):
        by_step.setdefault((step, exp_avg_sqs[i].dtype), []).append(i)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs)
    native = rows_kernel_wanted(backend, params[0].device)
    update, wants_tensors = resolve_update(
        block_adam_multi_update_, backend, triton=block_adam_multi_update_triton_, device=params[0].device
    )
    for (step, dtype), indices in by_step.items():
        step_size, bias_correction2_sqrt = adam_step_scalars(step, lr, beta1, beta2)
        hparams = dict(lr=lr, step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
        if native:
            from lightning_lowmem.optim.native_rows import update_natively

            indices = update_natively([[x[i] for i in indices] for x in tensors], indices, **hparams)
        if not wants_tensors:
            update(*([x[i] for i in indices] for x in tensors), **hparams)
            continue
        # the compiled path takes the scalars as 0-dim tensors in the state's dtype (as eager ops
        # cast Python scalars), so that a new step or learning rate does not recompile, and 2-D row
        # views, so that one graph serves a kind of update whatever the parameters' ranks
        for name in ("lr", "step_size", "bias_correction2_sqrt"):
            hparams[name] = torch.tensor(hparams[name], dtype=dtype)
        for group in _like_tensors(indices, params, layouts, mean_sqs):
            update(*_row_views([[x[i] for i in group] for x in tensors]), **hparams)


#: Tensors under this many entries share compiled calls with like tensors: for them a call's
#: overhead (tens of microseconds) is the step's cost. Larger ones get a call each, so that one
#: small graph serves every tensor of their shape (a graph over many tensors compiles slowly).
GROUP_BELOW = 1 << 16


def _like_tensors(indices: list[int], params: list[Tensor], layouts: list[RowLayout], mean_sqs: list[Tensor | None]) -> list[list[int]]:
    """``indices`` grouped by what a compiled graph specializes on (shape, dtype, kind of layout);
    tensors of at least :data:`GROUP_BELOW` entries alone."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        layout = layouts[i]
        numel = layout.group_numel if isinstance(layout.group_numel, float) else None
        key = (params[i].shape, params[i].dtype, layout.transposed, layout.elementwise,
               layout.group_index is None, numel, mean_sqs[i] is None, i if params[i].numel() >= GROUP_BELOW else -1)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _row_views(tensors: list[list[Any]]) -> list[list[Any]]:
    """``params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs`` as 2-D row views, untransposed layouts."""
    params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs = tensors
    rows = [[as_rows(x, layout.transposed) for x in group] for group, layout in zip(zip(params, grads, exp_avgs), layouts)]
    exp_avg_sqs = [as_rows(v, layout.transposed) if layout.elementwise else v for v, layout in zip(exp_avg_sqs, layouts)]
    layouts = [layout._replace(transposed=False) for layout in layouts]
    return [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], exp_avg_sqs, layouts, mean_sqs]
