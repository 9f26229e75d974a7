"""Structured configs for the optimizer and its learning-rate schedule, validated on construction.

Plain dataclasses, so they work as they are with omegaconf (``OmegaConf.structured(OptimConfig)``),
with LightningCLI / jsonargparse (a model argument ``optim: OptimConfig``) and in Python. Every value
is checked in ``__post_init__`` with a torch-style message that names the value and its allowed range
(NaN fails every check); :meth:`OptimConfig.from_any` also accepts a dict or a ``DictConfig`` and
rejects unknown keys.

Example::

    >>> cfg = OptimConfig(name="adam_mini", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
    ...                   scheduler=SchedulerConfig(name="cosine", warmup_steps=2000, min_lr_ratio=0.1))
    >>> OptimConfig.from_any({"name": "eve", "lr": 3e-4}) == OptimConfig(name="eve", lr=3e-4)
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_lowmem.kernels import check_backend
from lightning_lowmem.kernels.momentum_formats import DEFAULT_BLOCK, MomentumFormat
from lightning_lowmem.optim.hparams import check_adam_hparams, check_choice
from lightning_lowmem.optim.names import available_optimizers
from lightning_lowmem.partition.build import compile_rules
from lightning_lowmem.partition.structure import NO_DECAY_ROLES, ROLES

#: Names :class:`SchedulerConfig` accepts: a constant lr, or warmup then cosine / linear decay.
SCHEDULER_NAMES = ("none", "cosine", "linear")

_Config = TypeVar("_Config", "SchedulerConfig", "OptimConfig")


@dataclasses.dataclass
class SchedulerConfig:
    """The learning-rate schedule: linear warmup from 0, then decay to ``min_lr_ratio * lr``.

    The multiplier of every param group's lr at each optimizer step is
    :func:`lightning_lowmem.optim.schedulers.lr_multiplier`.

    Args:
        name: ``"none"`` (constant lr, warmup ignored), ``"cosine"`` or ``"linear"`` decay.
        warmup_steps: optimizer steps of linear warmup from 0 to ``lr``.
        min_lr_ratio: the lr at the end of the decay, as a fraction of ``lr``, in ``[0, 1]``.
        total_steps: the step at which the decay ends (constant after); ``None`` takes
            ``trainer.estimated_stepping_batches`` in :class:`~lightning_lowmem.LowMemOptimizerMixin`.

    Raises:
        TypeError: for a value of the wrong type (e.g. ``"1e-3"``: YAML reads it as a string).
        ValueError: for an unknown name or a value out of its range.

    Example::

        >>> SchedulerConfig(name="cosine", warmup_steps=100, min_lr_ratio=0.1)
    """

    name: str = "none"  # a constant lr unless asked: a schedule needs total_steps to mean anything
    warmup_steps: int = 0  # Adam's early v estimates are noisy; ~1-2% of the run is common for transformers
    min_lr_ratio: float = 0.0  # decay to 0 as in most papers; nanoGPT / Chinchilla use 0.1
    total_steps: Optional[int] = None  # None: the Trainer's estimated_stepping_batches

    def __post_init__(self) -> None:
        check_choice("scheduler name", self.name, SCHEDULER_NAMES)
        self.warmup_steps = _integer("warmup_steps", self.warmup_steps)
        if not 0 <= self.warmup_steps:
            raise ValueError(f"Invalid warmup_steps: {self.warmup_steps} (must be >= 0).")
        self.min_lr_ratio = _number("min_lr_ratio", self.min_lr_ratio)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid min_lr_ratio: {self.min_lr_ratio} (must be in [0, 1]).")
        if self.total_steps is not None:
            self.total_steps = _integer("total_steps", self.total_steps)
            if not 1 <= self.total_steps:
                raise ValueError(f"Invalid total_steps: {self.total_steps} (must be >= 1, or None for the Trainer's).")
            check_warmup_fits(self.warmup_steps, self.total_steps)

    @classmethod
    def from_any(cls, cfg: Any) -> SchedulerConfig:
        """Build a validated config from a ``SchedulerConfig``, a dict or an omegaconf ``DictConfig``.

        Raises:
            TypeError: if ``cfg`` is none of those.
            ValueError: for an unknown key (the message lists the valid ones) or an invalid value.
        """
        return _from_any(cls, cfg)


@dataclasses.dataclass
class OptimConfig:
    """Which optimizer to build, its hyperparameters and its learning-rate schedule.

    Args:
        name: a registered optimizer: ``"adamw"``, ``"adam_mini"``, ``"adam_mini_paper"``, ``"eve"``,
            ``"micro_adam"`` (and any added with :func:`~lightning_lowmem.optim.names.register_optimizer`).
        lr: peak learning rate, ``>= 0``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to :math:`\\sqrt{\\hat v}`, ``>= 0``.
        weight_decay: decoupled weight decay, ``>= 0``, for every parameter whose role is not in
            ``no_decay``.
        rules: ``{regex: spec}`` overriding the preset's block of the parameters whose name matches
            (``"full"``, ``"row"``, ``"tensor"``, ``"head:<head_dim>"``); ignored by ``adamw``.
        no_decay: parameter roles that get ``weight_decay=0`` (roles of
            :data:`~lightning_lowmem.partition.structure.ROLES`; ``()`` decays everything).
        backend: one of :data:`~lightning_lowmem.kernels.BACKENDS` (``"auto"`` picks the
            fastest available; see :func:`lightning_lowmem.kernels.resolve`).
        exp_avg_dtype: how AdamMini/Eve store the momentum: ``"fp32"``, ``"bf16"``, ``"int8"`` or
            ``"int4"`` (see :mod:`lightning_lowmem.kernels.momentum_formats`); ignored by ``adamw``
            and ``micro_adam``.
        exp_avg_block: entries of one row per scale of int8/int4 momentum, ``>= 2`` (even for int4).
        stochastic_rounding: AdamMini/Eve write bf16 parameters with stochastic rounding.
        scheduler: the :class:`SchedulerConfig` (a dict is converted).

    Raises:
        TypeError: for a value of the wrong type.
        ValueError: for an unknown optimizer name (the message lists the registered ones), a value
            out of its range, a rule that is not a valid regex or block spec, or an unknown role.

    Example::

        >>> cfg = OptimConfig(name="eve", lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        >>> optimizer = create_optimizer(model, cfg)
    """

    name: str = "adam_mini"  # about half of AdamW's state memory, same recipe (lr, betas, decay)
    lr: float = 1e-3  # Adam's default; GPT-style transformers usually take 3e-4..6e-4 with warmup
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's defaults; LLM recipes often use (0.9, 0.95)
    eps: float = 1e-8  # AdamW's default; only matters where v is tiny
    weight_decay: float = 0.01  # torch.optim.AdamW's default; nanoGPT uses 0.1
    rules: dict[str, str] = dataclasses.field(default_factory=dict)  # {} : the preset decides every block
    no_decay: tuple[str, ...] = NO_DECAY_ROLES  # bias, norm, (tied) embedding: as nanoGPT, only matmul weights decay
    backend: str = "auto"  # the fastest that works: a Triton kernel on CUDA where one exists, else torch.compile
    exp_avg_dtype: str = "fp32"  # AdamMini/Eve state: int8 about 1 byte per parameter, int4 about 0.5
    exp_avg_block: int = DEFAULT_BLOCK  # 128 entries of one row per fp32 scale: 0.03 bytes per parameter
    stochastic_rounding: bool = False  # for bf16 parameters: keeps updates below half a bf16 step
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)  # constant lr

    def __post_init__(self) -> None:
        _check_optimizer_name(self.name)
        self.lr = _number("lr", self.lr)
        self.betas = _pair("betas", self.betas)
        self.eps = _number("eps", self.eps)
        self.weight_decay = _number("weight_decay", self.weight_decay)
        check_adam_hparams(self.lr, self.betas, self.eps, self.weight_decay)
        for label, value in (("learning rate", self.lr), ("epsilon", self.eps), ("weight_decay", self.weight_decay)):
            if math.isinf(value):  # the ranges above are torch's, which let inf through
                raise ValueError(f"Invalid {label}: {value} (must be finite).")
        self.rules = _rules(self.rules)
        self.no_decay = _roles("no_decay", self.no_decay)
        check_backend(self.backend)
        self.exp_avg_block = _integer("exp_avg_block", self.exp_avg_block)
        MomentumFormat.of(self.exp_avg_dtype, self.exp_avg_block)
        if not isinstance(self.stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be true or false, got {self.stochastic_rounding!r}.")
        if not isinstance(self.scheduler, SchedulerConfig):
            self.scheduler = SchedulerConfig.from_any(self.scheduler)

    @classmethod
    def from_any(cls, cfg: Any) -> OptimConfig:
        """Build a validated config from an ``OptimConfig``, a dict or an omegaconf ``DictConfig``.

        An ``OptimConfig`` is validated again (it may have been changed since it was built) and
        returned as a copy. A nested ``scheduler`` may itself be any of these forms.

        Args:
            cfg: the config.

        Returns:
            A validated :class:`OptimConfig`.

        Raises:
            TypeError: if ``cfg`` is none of those forms.
            ValueError: for an unknown key (the message lists the valid ones) or an invalid value.

        Example::

            >>> OptimConfig.from_any(OmegaConf.create({"name": "eve", "lr": 0.01})).name
            'eve'
        """
        return _from_any(cls, cfg)


# A LightningModule that saves its hyperparameters puts these configs in every checkpoint; torch.load's
# default weights_only=True refuses classes it does not know, so allow these two (plain data, no code).
torch.serialization.add_safe_globals([OptimConfig, SchedulerConfig])


def check_warmup_fits(warmup_steps: int, total_steps: int) -> None:
    """Raise a ValueError when the warmup does not end by ``total_steps``.

    Raises:
        ValueError: if ``warmup_steps > total_steps``.
    """
    if not warmup_steps <= total_steps:
        raise ValueError(
            f"Invalid warmup_steps: {warmup_steps} (must be <= total_steps = {total_steps}); "
            "lower scheduler.warmup_steps or train for more steps."
        )


def config_keys(cls: type) -> tuple[str, ...]:
    """The field names of a config dataclass, in order."""
    return tuple(field.name for field in dataclasses.fields(cls))


def _from_any(cls: type[_Config], cfg: Any) -> _Config:
    """``cls`` built from an instance, a mapping or a ``DictConfig``, validated."""
    if isinstance(cfg, cls):
        return dataclasses.replace(cfg)
    cfg = _to_container(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"{cls.__name__}.from_any expects one of {cls.__name__}, dict, omegaconf DictConfig; "
            f"got {type(cfg).__name__}: {cfg!r}."
        )
    valid = config_keys(cls)
    unknown = [key for key in cfg if key not in valid]
    if unknown:
        hints = {key: difflib.get_close_matches(str(key), valid, n=1) for key in unknown}
        named = ", ".join(f"{key!r}" + (f" (did you mean {hints[key][0]!r}?)" if hints[key] else "") for key in unknown)
        raise ValueError(f"Unknown key(s) for {cls.__name__}: {named}; valid keys: {', '.join(valid)}.")
    return cls(**dict(cfg))


def _to_container(cfg: Any) -> Any:
    """A plain dict for an omegaconf ``DictConfig`` (interpolations resolved); anything else as is."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _check_optimizer_name(name: Any) -> None:
    """Raise a ValueError naming the registered optimizers when ``name`` is not one of them."""
    names = available_optimizers()
    if name not in names:
        raise ValueError(
            f"Invalid optimizer name: {name!r}; choose one of {', '.join(map(repr, names))} "
            "(or add one with lightning_lowmem.optim.names.register_optimizer)."
        )


def _number(key: str, value: Any) -> float:
    """``value`` as a float.

    Raises:
        TypeError: if it is not a real number (a bool or a string is not).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if _numeric_str(value):
            hint = f"; YAML 1.1 reads {value} as a string, write it with a dot and a signed exponent (1.0e-3)"
        raise TypeError(f"{key} must be a number, got {value!r} of type {type(value).__name__}{hint}.")
    return float(value)


def _numeric_str(value: Any) -> bool:
    """Whether ``value`` is a string of a finite number (``"1e-3"``: YAML 1.1 leaves it a string)."""
    if not isinstance(value, str):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _integer(key: str, value: Any) -> int:
    """``value`` as an int.

    Raises:
        TypeError: if it is not an integer (a bool, a float or a string is not).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{key} must be an integer, got {value!r} of type {type(value).__name__}.")
    return int(value)


def _pair(key: str, value: Any) -> tuple[float, float]:
    """``value`` as a pair of floats (a list or an omegaconf ``ListConfig`` is fine).

    Raises:
        ValueError: if it is not a sequence of two values.
        TypeError: if one of them is not a number.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a pair (beta1, beta2), got {value!r}.")
    items = tuple(value)
    if len(items) != 2:
        raise ValueError(f"{key} must be a pair (beta1, beta2), got {items!r}.")
    return (_number(f"{key}[0]", items[0]), _number(f"{key}[1]", items[1]))


def _rules(value: Any) -> dict[str, str]:
    """``{regex: spec}`` with every regex compiled and every spec parsed once, specs as canonical strings.

    Raises:
        ValueError: if ``value`` is not a mapping, or a rule's regex or spec is invalid.
    """
    if value is None:
        return {}
    value = _to_container(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"rules must be a mapping {{regex: spec}}, got {value!r}; e.g. {{'lm_head': 'full'}}.")
    return {rule.pattern: str(rule.spec) for rule in compile_rules(value)}


def _roles(key: str, value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of parameter roles.

    Raises:
        ValueError: if it is a single string or holds a role that does not exist.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of roles, got {value!r}; write e.g. ['bias', 'norm'].")
    roles = tuple(value)
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"Invalid {key} role(s): {unknown}; choose among {', '.join(ROLES)}.")
    return roles
