"""Hyperparameter checks shared by every optimizer of the package.

Each check is one comparison written so that NaN fails too (``not lo <= x < hi`` is True for NaN),
and each message names the value and the allowed range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_adam_hparams(lr: float | torch.Tensor, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """Validate the hyperparameters every Adam-style optimizer here takes.

    Raises:
        ValueError: naming the first value outside its range.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements.")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {tuple(betas)}.")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta1: {betas[0]} (must be in [0, 1)).")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta2: {betas[1]} (must be in [0, 1)).")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon: {eps} (must be >= 0).")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0).")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise a ValueError listing ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; choose one of {', '.join(map(repr, choices))}.")
