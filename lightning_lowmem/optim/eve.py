"""``Eve``: AdamW with the second moment of every linear layer reduced to one value per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_lowmem.kernels.momentum_formats import DEFAULT_BLOCK
from lightning_lowmem.optim.base import ParamsLike
from lightning_lowmem.optim.block_adam import BlockAdam
from lightning_lowmem.partition import NO_DECAY_ROLES, BlockPlan


class Eve(BlockAdam):
    r"""Eve (Tomar et al.): AdamW whose :math:`v` is the row mean of :math:`g^2` for linear weights.

    For a weight :math:`W \in \mathbb{R}^{M\times N}` used as a linear layer (a tied output head
    included), :math:`v \in \mathbb{R}^{M}` with
    :math:`v_r \leftarrow \beta_2 v_r + (1-\beta_2)\frac{1}{N}\sum_j g_{rj}^2`, so the state is
    :math:`M(N+1)` values instead of :math:`2MN`. Every other parameter keeps AdamW's elementwise
    :math:`v`. Bias correction and decoupled weight decay as in AdamW, with AdamW's defaults.

    This is :class:`BlockAdam` with the ``"eve"`` preset; the arguments are documented there.

    Example::

        >>> optimizer = Eve(model, lr=3e-4, weight_decay=0.1)
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float | torch.Tensor = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        plan: BlockPlan | None = None,
        rules: Any = None,
        no_decay: Sequence[str] = NO_DECAY_ROLES,
        maximize: bool = False,
        backend: str = "auto",
        exp_avg_dtype: str = "fp32",
        exp_avg_block: int = DEFAULT_BLOCK,
        stochastic_rounding: bool = False,
        **torch_options: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, plan=plan, preset="eve", rules=rules,
                         no_decay=no_decay, maximize=maximize, backend=backend, exp_avg_dtype=exp_avg_dtype,
                         exp_avg_block=exp_avg_block, stochastic_rounding=stochastic_rounding,
                         **torch_options)
