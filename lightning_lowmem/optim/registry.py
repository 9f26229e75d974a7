"""The optimizers a config can name: ``name -> factory(model, cfg) -> torch.optim.Optimizer``.

A new optimizer registers itself where it is defined (:func:`register_optimizer`, from
:mod:`lightning_lowmem.optim.names`); once the module holding that code is imported,
:class:`~lightning_lowmem.config.OptimConfig` accepts its name::

    @register_optimizer("my_adam")
    def _my_adam(model: nn.Module, cfg: OptimConfig) -> Optimizer:
        return MyAdam(model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

Every built-in factory splits the parameters into the same decayed / not-decayed groups (by the
parameter roles of the model's block plan and ``cfg.no_decay``), so an ``adamw`` run is a fair
baseline for an ``adam_mini`` or ``eve`` run of the same config.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_lowmem.config import OptimConfig
from lightning_lowmem.optim.adam_mini import AdamMini
from lightning_lowmem.optim.adamw import NamedAdamW
from lightning_lowmem.optim.eve import Eve
from lightning_lowmem.optim.micro_adam import MicroAdam
from lightning_lowmem.optim.names import OPTIMIZERS, available_optimizers, register_optimizer
from lightning_lowmem.optim.param_groups import model_decay_groups
from lightning_lowmem.partition import BlockPlan

log = logging.getLogger(__name__)


def create_optimizer(model: nn.Module, cfg: Any) -> Optimizer:
    """Build the optimizer ``cfg`` names over the trainable parameters of ``model``.

    Args:
        model: the model; its structure decides the blocks and the weight-decay groups. Its
            parameters may be FSDP2 ``DTensor`` s: only global shapes are read.
        cfg: an :class:`~lightning_lowmem.config.OptimConfig`, a dict or an omegaconf ``DictConfig``.

    Returns:
        The optimizer. Block optimizers carry their plan (see :func:`plan_of`).

    Raises:
        TypeError, ValueError: for an invalid config (see :meth:`OptimConfig.from_any`).

    Example::

        >>> optimizer = create_optimizer(model, {"name": "adam_mini", "lr": 6e-4})
        >>> print(plan_of(optimizer))
    """
    cfg = OptimConfig.from_any(cfg)
    return OPTIMIZERS[cfg.name](model, cfg)


def plan_of(optimizer: Optimizer) -> BlockPlan | None:
    """The :class:`BlockPlan` of a block optimizer (``AdamMini``, ``Eve``, ...), ``None`` for others.

    Example::

        >>> plan_of(torch.optim.AdamW(model.parameters())) is None
        True
    """
    plan = getattr(optimizer, "plan", None)
    return plan if isinstance(plan, BlockPlan) else None


def decay_groups(model: nn.Module, no_decay: tuple[str, ...]) -> list[dict[str, Any]]:
    """The decayed / not-decayed param groups of ``model``, by the roles of its ``adam_mini`` plan.

    These are the groups :class:`~lightning_lowmem.optim.block_adam.BlockAdam` builds (roles do not
    depend on the preset), with ``(name, parameter)`` pairs so the optimizer's state dict is named.

    Args:
        model: the model; frozen parameters are left out.
        no_decay: roles that get ``weight_decay=0``.

    Returns:
        One group of decayed parameters and one with ``weight_decay=0.0`` (an empty one is left out).
    """
    return model_decay_groups(model, no_decay)


def _block_adam_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    """The keyword arguments every block optimizer takes, from ``cfg``."""
    return dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                rules=cfg.rules or None, no_decay=cfg.no_decay, backend=cfg.backend, exp_avg_dtype=cfg.exp_avg_dtype,
                exp_avg_block=cfg.exp_avg_block, stochastic_rounding=cfg.stochastic_rounding)


@register_optimizer("adamw")
def _adamw(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """``torch.optim.AdamW`` with the block optimizers' weight-decay groups (``rules``/``backend`` unused),
    naming the plain tensors of groups added later from ``model``."""
    if cfg.rules:
        log.warning("adamw has no blocks: the rules %s are ignored.", cfg.rules)
    return NamedAdamW(model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      no_decay=cfg.no_decay)


@register_optimizer("adam_mini")
def _adam_mini(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """``AdamMini`` with the reference implementation's (v1.1) blocks."""
    return AdamMini(model, preset="adam_mini", **_block_adam_kwargs(cfg))


@register_optimizer("adam_mini_paper")
def _adam_mini_paper(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """``AdamMini`` with the paper's (Algorithms 2-4) blocks."""
    return AdamMini(model, preset="adam_mini_paper", **_block_adam_kwargs(cfg))


@register_optimizer("eve")
def _eve(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """``Eve``: one second moment per row of every linear weight."""
    return Eve(model, **_block_adam_kwargs(cfg))


@register_optimizer("micro_adam")
def _micro_adam(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """``MicroAdam``: a window of 1%-sparse gradients plus 4-bit error feedback (about 1 byte/param)."""
    if cfg.rules:
        log.warning("micro_adam has no blocks: the rules %s are ignored.", cfg.rules)
    optimizer = MicroAdam(decay_groups(model, cfg.no_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, backend=cfg.backend)
    optimizer.bind_model(model)  # BaseFinetuning's plain groups get names from it
    return optimizer
