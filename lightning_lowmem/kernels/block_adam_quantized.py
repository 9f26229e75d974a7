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

:func:`block_adam_quantized_multi_update_` is the ``"torch"`` implementation of the op and
:func:`block_adam_quantized_compiled_` the ``"compile"`` one (the same update under ``torch.compile``).

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

from lightning_lowmem.kernels.block_adam import _like_tensors, block_adam_update_
from lightning_lowmem.kernels.compiled import compiled
from lightning_lowmem.kernels.layout import RowLayout
from lightning_lowmem.kernels.momentum_formats import MomentumFormat, QuantizedMomentum, decode, encode_, stochastic_round_bf16

#: the parameter's random bits are drawn with ``seed ^ PARAM_SEED_XOR``, the momentum's with ``seed``.
PARAM_SEED_XOR = 0x5BD1E995


def block_adam_quantized_update_(param: Tensor, grad: Tensor, exp_avg: QuantizedMomentum, exp_avg_sq: Tensor, *,
                                 layout: RowLayout, fmt: MomentumFormat, seed: int | Tensor, stochastic_rounding: bool,
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
                                       mean_sqs: list[Tensor | None], formats: list[MomentumFormat],
                                       seeds: list[int] | list[Tensor],
                                       *, stochastic_rounding: bool, **hparams: Any) -> None:
    """:func:`block_adam_quantized_update_` over lists: the ``"torch"`` implementation of the op
    (seeds: ints, or 0-dim int64 tensors as :func:`block_adam_quantized_compiled_` passes them)."""
    for param, grad, exp_avg, exp_avg_sq, layout, mean_sq, fmt, seed in zip(
            params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats, seeds):
        block_adam_quantized_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, fmt=fmt, seed=seed,
                                     stochastic_rounding=stochastic_rounding, mean_sq=mean_sq, **hparams)


def block_adam_quantized_compiled_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[QuantizedMomentum],
                                   exp_avg_sqs: list[Tensor], layouts: list[RowLayout], mean_sqs: list[Tensor | None],
                                   formats: list[MomentumFormat], seeds: list[int], *, stochastic_rounding: bool,
                                   **hparams: Any) -> None:
    """:func:`block_adam_quantized_multi_update_` under ``torch.compile``: the ``"compile"`` implementation.

    The whole step of a tensor compiles into one graph: decode, update, encode (int8 rounding,
    int4's midpoint search by ``torch.bucketize``) and the stochastic rounding of bf16 values, whose
    random bits are integer arithmetic on the entries' indices. ``lr``, ``step_size``,
    ``bias_correction2_sqrt`` and the seeds (a new one every step) go in as 0-dim tensors, so that
    neither a new step nor a scheduled learning rate recompiles; tensors of one shape, dtype, layout
    kind and format share graphs as :func:`~lightning_lowmem.kernels.block_adam.block_adam_compiled_`
    groups them. Where compilation fails, the eager reference runs after one warning
    (:mod:`.compiled`).
    """
    update = compiled(block_adam_quantized_multi_update_)
    dtype = exp_avg_sqs[0].dtype if exp_avg_sqs else torch.float32
    for name in ("lr", "step_size", "bias_correction2_sqrt"):
        hparams[name] = torch.as_tensor(hparams[name], dtype=dtype)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats,
               [torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64) for seed in seeds])
    groups: dict[MomentumFormat, list[int]] = {}
    for i, fmt in enumerate(formats):
        groups.setdefault(fmt, []).append(i)
    for fmt, indices in groups.items():
        for group in _like_tensors([params[i] for i in indices], [layouts[i] for i in indices],
                                   [mean_sqs[i] for i in indices]):
            update(*([x[indices[i]] for i in group] for x in tensors), stochastic_rounding=stochastic_rounding,
                   **hparams)
