"""Learning-rate schedules: linear warmup from 0, then cosine or linear decay to ``min_lr_ratio * lr``.

:func:`lr_multiplier` is the schedule as a pure function of the step; :func:`build_scheduler` wraps it
in a ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per optimizer step).

Example::

    >>> cfg = SchedulerConfig(name="cosine", warmup_steps=100, min_lr_ratio=0.1)
    >>> scheduler = build_scheduler(optimizer, cfg, total_steps=10_000)
    >>> lr_multiplier(5_050, cfg, total_steps=10_000)
    0.55
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_lowmem.config import SchedulerConfig, check_warmup_fits


def lr_multiplier(step: int, cfg: SchedulerConfig, total_steps: int) -> float:
    r"""The factor applied to every param group's lr after ``step`` optimizer steps.

    With :math:`s` = ``step``, :math:`w` = ``cfg.warmup_steps``, :math:`T` = ``total_steps``,
    :math:`r` = ``cfg.min_lr_ratio`` and :math:`p = \mathrm{clamp}((s - w) / (T - w), 0, 1)`
    (:math:`p = 1` when :math:`T = w`):

    .. math::

        f(s) = \begin{cases}
            s / w & s < w \quad\text{(linear warmup from 0)} \\
            r + (1 - r)\,\tfrac{1}{2}\,(1 + \cos \pi p) & \text{cosine} \\
            r + (1 - r)\,(1 - p) & \text{linear}
        \end{cases}

    so :math:`f(w) = 1`, :math:`f(s) = r` for :math:`s \ge T`, and ``"none"`` gives 1 at every step.

    Args:
        step: optimizer steps taken so far, ``>= 0``.
        cfg: the schedule.
        total_steps: the step at which the decay ends, ``>= cfg.warmup_steps`` and ``>= 1``.

    Returns:
        The multiplier, in ``[0, 1]``.

    Raises:
        ValueError: for a negative step, ``total_steps < 1`` or a warmup longer than ``total_steps``.

    Example::

        >>> lr_multiplier(50, SchedulerConfig("linear", warmup_steps=100), total_steps=1000)
        0.5
    """
    if not 0 <= step:
        raise ValueError(f"Invalid step: {step} (must be >= 0).")
    if cfg.name == "none":
        return 1.0
    check_total_steps(cfg, total_steps)
    warmup = cfg.warmup_steps
    if step < warmup:
        return step / warmup
    progress = 1.0 if total_steps == warmup else min(1.0, (step - warmup) / (total_steps - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def check_total_steps(cfg: SchedulerConfig, total_steps: int) -> None:
    """Raise a ValueError when ``total_steps`` cannot end the schedule ``cfg``.

    Raises:
        ValueError: if ``total_steps`` is not a finite integer ``>= 1`` or is shorter than the warmup.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or not 1 <= total_steps:
        raise ValueError(
            f"Invalid total_steps: {total_steps!r} (must be an integer >= 1); set scheduler.total_steps, "
            "or Trainer(max_steps=...) so that trainer.estimated_stepping_batches is finite."
        )
    check_warmup_fits(cfg.warmup_steps, total_steps)


def build_scheduler(optimizer: Optimizer, cfg: SchedulerConfig, total_steps: int) -> LambdaLR | None:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every param group, or ``None`` for ``"none"``.

    Step it once per optimizer step (Lightning: ``"interval": "step"``). Its state dict holds only the
    step count, so a checkpoint resumes the schedule where it stopped.

    Args:
        optimizer: the optimizer; each group's current ``lr`` is its peak lr.
        cfg: the schedule (a dict or ``DictConfig`` is converted).
        total_steps: the step at which the decay ends.

    Returns:
        The scheduler, or ``None`` when ``cfg.name == "none"``.

    Raises:
        ValueError: for an invalid ``cfg`` or ``total_steps`` (see :func:`check_total_steps`).

    Example::

        >>> scheduler = build_scheduler(optimizer, SchedulerConfig("cosine", warmup_steps=10), 1000)
    """
    cfg = SchedulerConfig.from_any(cfg)
    if cfg.name == "none":
        return None
    check_total_steps(cfg, total_steps)
    return LambdaLR(optimizer, functools.partial(lr_multiplier, cfg=cfg, total_steps=total_steps))
