r"""The block-Adam update with a stored momentum format: the reference of the ``block_adam_quantized`` op.

One step of :func:`~lightning_lowmem.kernels.block_adam.block_adam_update_` where the momentum
:math:`m` is kept in a :class:`~lightning_lowmem.kernels.momentum_formats.MomentumFormat` (bf16,
blockwise int8 or int4) and/or the parameter is bf16 written with stochastic rounding:

.. math::

    m \leftarrow \mathrm{decode}(q, s), \quad
    (\theta, m, v) \leftarrow \text{block-Adam step}(\theta, g, m, v), \quad
    (q, s) \leftarrow \mathrm{encode}(m)

with :math:`\theta` written back by :func:`~lightning_lowmem.kernels.momentum_formats.stochastic_round_bf16`
when ``stochastic_rounding`` and the parameter is bf16. The random bits of an entry come from
``seeds[i]`` (the momentum) and ``seeds[i] ^ PARAM_SEED_XOR`` (the parameter) and its flat index,
so every backend (the C kernel, Triton) rounds the same way.

Example::

    >>> fmt = MomentumFormat.of("int8")
    >>> p, g, v = torch.randn(4, 256), torch.randn(4, 256), torch.zeros(4)
    >>> m = fmt.new_state(p.shape, p.device)
    >>> block_adam_quantized_multi_update_([p], [g], [m], [v], [RowLayout(elementwise=False, group_numel=256.0)],
    ...     [None], [fmt], [1], stochastic_rounding=False, lr=1e-3, step_size=1e-2, bias_correction2_sqrt=0.03,
    ...     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_lowmem.kernels.block_adam import block_adam_update_
from lightning_lowmem.kernels.layout import RowLayout
from lightning_lowmem.kernels.momentum_formats import MomentumFormat, QuantizedMomentum, decode, encode_, stochastic_round_bf16

#: the parameter's random bits are drawn with ``seed ^ PARAM_SEED_XOR``, the momentum's with ``seed``.
PARAM_SEED_XOR = 0x5BD1E995


def block_adam_quantized_update_(param: Tensor, grad: Tensor, exp_avg: QuantizedMomentum, exp_avg_sq: Tensor, *,
                                 layout: RowLayout, fmt: MomentumFormat, seed: int, stochastic_rounding: bool,
                                 mean_sq: Tensor | None = None, **hparams: Any) -> None:
    """One step of one tensor whose momentum ``exp_avg`` is stored in ``fmt`` (``hparams``: those of
    :func:`~lightning_lowmem.kernels.block_adam.block_adam_update_`)."""
    m = decode(exp_avg, fmt, param.shape)
    rounded = stochastic_rounding and param.dtype == torch.bfloat16
    p = param.to(torch.float32) if rounded else param
    block_adam_update_(p, grad, m, exp_avg_sq, layout=layout, mean_sq=mean_sq, **hparams)
    if rounded:
        param.copy_(stochastic_round_bf16(p, seed ^ PARAM_SEED_XOR))
    encode_(exp_avg, m, fmt, seed)


def block_adam_quantized_multi_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[QuantizedMomentum],
                                       exp_avg_sqs: list[Tensor], layouts: list[RowLayout],
                                       mean_sqs: list[Tensor | None], formats: list[MomentumFormat], seeds: list[int],
                                       *, stochastic_rounding: bool, **hparams: Any) -> None:
    """:func:`block_adam_quantized_update_` over lists: the ``"torch"`` implementation of the op."""
    for param, grad, exp_avg, exp_avg_sq, layout, mean_sq, fmt, seed in zip(
            params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats, seeds):
        block_adam_quantized_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, fmt=fmt, seed=seed,
                                     stochastic_rounding=stochastic_rounding, mean_sq=mean_sq, **hparams)
