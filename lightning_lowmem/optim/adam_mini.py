"""``AdamMini``: Adam-mini (Zhang et al., 2024), one second moment per Hessian block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_lowmem.kernels.momentum_formats import DEFAULT_BLOCK
from lightning_lowmem.optim.base import ParamsLike
from lightning_lowmem.optim.block_adam import BlockAdam
from lightning_lowmem.optim.hparams import check_choice
from lightning_lowmem.partition import NO_DECAY_ROLES, BlockPlan

ADAM_MINI_PRESETS = ("adam_mini", "adam_mini_paper")


class AdamMini(BlockAdam):
    r"""Adam-mini: AdamW with :math:`v` averaged over blocks that follow the Hessian's structure.

    Queries and keys get one :math:`v` per attention head; with the default ``"adam_mini"`` preset
    (the reference implementation's v1.1 rules) values, attention outputs, MLPs, embeddings and the
    output head get one per output row, norms one per tensor and biases stay elementwise. The
    ``"adam_mini_paper"`` preset follows the paper's Algorithms 2-4 (embedding and output
    elementwise, everything else one per tensor). About half of AdamW's state memory.

    The update is :class:`BlockAdam`'s; all arguments are documented there.

    Example::

        >>> optimizer = AdamMini(model, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
        >>> print(optimizer.plan)  # which parameter got which blocks, state bytes versus AdamW
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float | torch.Tensor = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        preset: str = "adam_mini",
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
        check_choice("preset for AdamMini", preset, ADAM_MINI_PRESETS)
        super().__init__(params, lr, betas, eps, weight_decay, plan=plan, preset=preset, rules=rules,
                         no_decay=no_decay, maximize=maximize, backend=backend, exp_avg_dtype=exp_avg_dtype,
                         exp_avg_block=exp_avg_block, stochastic_rounding=stochastic_rounding,
                         **torch_options)
