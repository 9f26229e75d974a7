r"""The functional API of AdamMini and Eve: one step over lists of tensors.

:func:`block_adam` counts the steps, computes each step's scalars once
(:func:`~lightning_lowmem.kernels.block_adam.adam_step_scalars`) and hands the tensors to the
implementation :func:`lightning_lowmem.kernels.resolve` picks for ``backend``. The update itself,
with its math, is :func:`lightning_lowmem.kernels.block_adam.block_adam_update_`.

Example::

    >>> p, g = torch.randn(4, 3), torch.randn(4, 3)
    >>> m, v, step = torch.zeros(4, 3), torch.zeros(4), torch.tensor(0.0)
    >>> block_adam([p], [g], [m], [v], [step], [RowLayout(elementwise=False, group_numel=3.0)],
    ...            lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lowmem.kernels import RowLayout, resolve
from lightning_lowmem.kernels.block_adam import adam_step_scalars
from lightning_lowmem.kernels.momentum_formats import MomentumFormat, QuantizedMomentum, step_seed


def block_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor | QuantizedMomentum],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    layouts: list[RowLayout],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    mean_sqs: list[Tensor | None] | None = None,
    backend: str = "torch",
    formats: list[MomentumFormat | None] | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    positions: list[int] | None = None,
    index_bases: list[int] | None = None,
) -> None:
    """One step over lists of tensors (increments ``state_steps``).

    Args:
        exp_avgs: per tensor, the momentum: a tensor, or a :class:`QuantizedMomentum` stored in
            its ``formats`` entry (those tensors go to the ``block_adam_quantized`` op).
        layouts: per tensor, how its rows share second moments.
        mean_sqs: per tensor, an already reduced block mean of ``g**2`` or ``None``.
        backend: one of :data:`lightning_lowmem.kernels.BACKENDS`, resolved by
            :func:`lightning_lowmem.kernels.resolve` for the tensors' device.
        formats: per tensor, the :class:`MomentumFormat` of a :class:`QuantizedMomentum`, else ``None``.
        stochastic_rounding: write bf16 parameters of the quantized op with stochastic rounding.
        seed: mixed with the step and each tensor's position into the seeds of stochastic rounding:
            tensor :math:`i` rounds at step :math:`t` with ``step_seed(seed + positions[i], t)``.
        positions: per tensor, its position for the seed: the parameter's index in its param group
            (the same on every rank, and for all banks of a parameter); default: its index in these lists.
        index_bases: per tensor, the flat index of its first entry in the whole parameter (an FSDP2
            shard's dim-0 offset times the entries per dim-0 index, plus a bank's offset); default 0.
            Entry :math:`j` of tensor :math:`i` draws the random bits of index ``index_bases[i] + j``,
            so sharded runs round as one process does.
    """
    if not params:
        return
    if mean_sqs is None:
        mean_sqs = [None] * len(params)
    if formats is None:
        formats = [None] * len(params)
    if positions is None:
        positions = list(range(len(params)))
    if index_bases is None:
        index_bases = [0] * len(params)
    torch._foreach_add_(state_steps, 1)
    # tensors usually share a step; those that do share the step's scalars
    by_step: dict[tuple[float, torch.dtype], list[int]] = {}
    for i, step in enumerate(torch.stack(state_steps).tolist()):
        by_step.setdefault((step, exp_avg_sqs[i].dtype), []).append(i)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs)
    for (step, _), indices in by_step.items():
        step_size, bias_correction2_sqrt = adam_step_scalars(step, lr, beta1, beta2)
        hparams = dict(lr=lr, step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
        plain = [i for i in indices if formats[i] is None]
        stored = [i for i in indices if formats[i] is not None]
        if plain:
            resolve("block_adam", backend, params[0].device)(*([x[i] for i in plain] for x in tensors), **hparams)
        if stored:
            resolve("block_adam_quantized", backend, params[0].device)(
                *([x[i] for i in stored] for x in tensors), [formats[i] for i in stored],
                [step_seed(seed + positions[i], step) for i in stored], stochastic_rounding=stochastic_rounding,
                index_bases=[index_bases[i] for i in stored], **hparams)
