r"""The block-Adam update with a stored momentum format: the reference of the ``block_adam_quantized`` op.

One step of :func:`~lightning_lowmem.kernels.block_adam.block_adam_update_` where the momentum
:math:`m` is kept in a :class:`~lightning_lowmem.kernels.momentum_formats.MomentumFormat` (bf16,
blockwise int8 or int4) and/or the parameter is bf16 written with stochastic rounding:

.. math::

    m \leftarrow \mathrm{decode}(q, s), \quad
    (\theta, m, v) \leftarrow \text{block-Adam step}(\theta, g, m, v), \quad
    (q, s) \leftarrow \mathrm{encode}(m)

with :math:`\theta` written back by :func:`~lightning_lowmem.kernels.momentum_formats.stochastic_round_bf16`
when ``stochastic_rounding`` and the parameter is bf16. The random bits of entry :math:`j` (flat,
row-major) of tensor :math:`i` come from ``seeds[i]`` (the momentum) and ``seeds[i] ^ PARAM_SEED_XOR``
(the parameter) and its GLOBAL flat index :math:`\mathrm{index\_bases}[i] + j`, so every backend
(the C kernel, Triton) rounds the same way, and a dim-0 shard of a tensor (FSDP2) given the flat
index of its first entry in the whole tensor rounds as the whole tensor in one process does.

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
                                 mean_sq: Tensor | None = None, index_base: int | Tensor = 0, **hparams: Any) -> None:
    """One step of one tensor whose momentum ``exp_avg`` is stored in ``fmt`` (``hparams``: those of
    :func:`~lightning_lowmem.kernels.block_adam.block_adam_update_`); ``index_base``: the global
    flat index of ``param``'s first entry (entry :math:`j` rounds with the bits of ``index_base + j``)."""
    m = decode(exp_avg, fmt, param.shape)
    rounded = stochastic_rounding and param.dtype == torch.bfloat16
    p = param.to(torch.float32) if rounded else param
    block_adam_update_(p, grad, m, exp_avg_sq, layout=layout, mean_sq=mean_sq, **hparams)
    if rounded:
        param.copy_(stochastic_round_bf16(p, seed ^ PARAM_SEED_XOR, index_base))
    encode_(exp_avg, m, fmt, seed, index_base)


def block_adam_quantized_multi_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[QuantizedMomentum],
                                       exp_avg_sqs: list[Tensor], layouts: list[RowLayout],
                                       mean_sqs: list[Tensor | None], formats: list[MomentumFormat],
                                       seeds: list[int] | list[Tensor],
                                       *, stochastic_rounding: bool,
                                       index_bases: list[int] | list[Tensor] | None = None, **hparams: Any) -> None:
    r""":func:`block_adam_quantized_update_` over lists: the ``"torch"`` implementation of the op
    (seeds and ``index_bases``: ints, or 0-dim int64 tensors as :func:`block_adam_quantized_compiled_`
    passes them).

    ``index_bases[i]`` is the global flat index of the first entry of ``params[i]`` (0 for a whole
    tensor, the default): entry :math:`j` of the tensor draws its random bits at index
    :math:`\mathrm{index\_bases}[i] + j`."""
    if index_bases is None:
        index_bases = [0] * len(params)
    for param, grad, exp_avg, exp_avg_sq, layout, mean_sq, fmt, seed, base in zip(
            params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats, seeds, index_bases):
        block_adam_quantized_update_(param, grad, exp_avg, exp_avg_sq, layout=layout, fmt=fmt, seed=seed,
                                     stochastic_rounding=stochastic_rounding, mean_sq=mean_sq, index_base=base,
                                     **hparams)


def block_adam_quantized_compiled_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[QuantizedMomentum],
                                   exp_avg_sqs: list[Tensor], layouts: list[RowLayout], mean_sqs: list[Tensor | None],
                                   formats: list[MomentumFormat], seeds: list[int], *, stochastic_rounding: bool,
                                   index_bases: list[int] | None = None, **hparams: Any) -> None:
    """:func:`block_adam_quantized_multi_update_` under ``torch.compile``: the ``"compile"`` implementation.

    The whole step of a tensor compiles into one graph: decode, update, encode (int8 rounding,
    int4's midpoint search by ``torch.bucketize``) and the stochastic rounding of bf16 values, whose
    random bits are integer arithmetic on the entries' indices. ``lr``, ``step_size``,
    ``bias_correction2_sqrt``, the seeds (a new one every step) and the ``index_bases`` (the global
    flat index of each tensor's first entry, see :func:`block_adam_quantized_multi_update_`) go in as
    0-dim tensors, so that neither a new step, a scheduled learning rate nor a shard's offset
    recompiles; tensors of one shape, dtype, layout kind and format share graphs as
    :func:`~lightning_lowmem.kernels.block_adam.block_adam_compiled_` groups them. Where compilation fails, the eager reference runs after one warning
    (:mod:`.compiled`).
    """
    update = compiled(block_adam_quantized_multi_update_)
    dtype = exp_avg_sqs[0].dtype if exp_avg_sqs else torch.float32
    for name in ("lr", "step_size", "bias_correction2_sqrt"):
        hparams[name] = torch.as_tensor(hparams[name], dtype=dtype)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, formats,
               [torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64) for seed in seeds],
               [torch.tensor(base, dtype=torch.int64) for base in (index_bases or [0] * len(params))])
    groups: dict[MomentumFormat, list[int]] = {}
    for i, fmt in enumerate(formats):
        groups.setdefault(fmt, []).append(i)
    for fmt, indices in groups.items():
        for group in _like_tensors([params[i] for i in indices], [layouts[i] for i in indices],
                                   [mean_sqs[i] for i in indices]):
            *lists, bases = ([x[indices[i]] for i in group] for x in tensors)
            update(*lists, stochastic_rounding=stochastic_rounding, index_bases=bases, **hparams)
