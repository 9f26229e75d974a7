"""``LowMemOptimizerMixin``: ``configure_optimizers`` built from an :class:`~lightning_lowmem.config.OptimConfig`.

Example::

    class GPT(LowMemOptimizerMixin, L.LightningModule):
        def __init__(self, optim: OptimConfig | None = None):
            super().__init__()
            self.save_hyperparameters()          # the mixin reads self.hparams.optim
            ...

    model = GPT(optim=OptimConfig(name="adam_mini", lr=6e-4,
                                  scheduler=SchedulerConfig(name="cosine", warmup_steps=100)))
    L.Trainer(max_steps=10_000).fit(model, data)
    print(model.lowmem_plan)                     # which parameters share a second moment

Or with LightningCLI's dependency injection (``--model.optimizer=lightning_lowmem.Eve``,
``--model.optimizer.lr=3e-4``, or ``class_path``/``init_args`` in a YAML)::

    class GPT(LowMemOptimizerMixin, L.LightningModule):
        def __init__(self, optimizer: OptimizerCallable = AdamMini):
            super().__init__()
            self.lowmem_optimizer = optimizer    # called with the module: blocks from its structure
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from lightning_lowmem.config import OptimConfig
from lightning_lowmem.optim.base import ModelNamedGroups
from lightning_lowmem.optim.registry import available_optimizers, create_optimizer, plan_of
from lightning_lowmem.optim.schedulers import build_scheduler
from lightning_lowmem.partition import BlockPlan

#: The hyperparameter :class:`LowMemOptimizerMixin` reads first (``self.hparams.optim``).
HPARAMS_KEY = "optim"
#: The attribute it reads when the hyperparameter is missing or ``None``.
CONFIG_ATTRIBUTE = "lowmem_optim_config"
#: The attribute holding an optimizer factory called with the module (LightningCLI's ``OptimizerCallable``).
FACTORY_ATTRIBUTE = "lowmem_optimizer"


class LowMemOptimizerMixin:
    """Implements ``configure_optimizers`` of a ``LightningModule`` from an optimizer config.

    Put it before ``LightningModule`` in the bases. The optimizer comes from, in order,

    1. ``self.hparams.optim``: a model ``__init__`` argument ``optim`` saved with
       ``self.save_hyperparameters()`` (this is what LightningCLI's ``--model.optim.name=eve`` sets);
    2. ``self.lowmem_optimizer``: a callable that takes the module and returns the optimizer, e.g.
       the ``OptimizerCallable`` LightningCLI injects (``--model.optimizer=lightning_lowmem.AdamMini``
       with every argument of the class from the command line or a YAML), ``AdamMini`` itself, or
       ``functools.partial(Eve, lr=3e-4)``; LightningCLI's own ``--optimizer`` would hand the class
       ``model.parameters()``, without the names and structure the blocks are decided from;
    3. ``self.lowmem_optim_config``: an attribute set in ``__init__``.

    A config (1 or 3) may be an :class:`~lightning_lowmem.config.OptimConfig`, a dict or an omegaconf
    ``DictConfig``. The optimizer is built over the module's own parameters, after
    ``configure_model``: FSDP2 ``DTensor`` parameters are fine, blocks follow their global shapes.
    The scheduler (unless ``"none"``) steps every optimizer step; its ``total_steps`` is
    ``scheduler.total_steps`` or ``trainer.estimated_stepping_batches``. A factory (2) gives the
    optimizer alone: add a schedule by overriding ``configure_optimizers``.

    The optimizer names the plain tensors of a group added later from the module (Lightning's
    ``BaseFinetuning``/``BackboneFinetuning`` unfreezing layers), and block optimizers give them
    blocks from its structure.

    Attributes:
        lowmem_plan: the optimizer's :class:`~lightning_lowmem.partition.BlockPlan` once
            ``configure_optimizers`` has run (``None`` before, and for ``adamw``); its table is logged
            once on rank zero. Parameters added later (``BaseFinetuning``) extend ``optimizer.plan``,
            not this snapshot.

    Raises:
        ValueError: from ``configure_optimizers``, when no config is found (the message says where to
            put one), for an invalid config, or when the schedule has no finite ``total_steps``.

    Example::

        class Net(LowMemOptimizerMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.lowmem_optim_config = {"name": "eve", "lr": 3e-4}
    """

    lowmem_plan: BlockPlan | None = None

    def resolve_lowmem_config(self) -> OptimConfig:
        """The validated optimizer config of this module (see the class docstring for where it is read).

        Returns:
            A validated copy, as an :class:`~lightning_lowmem.config.OptimConfig`.

        Raises:
            ValueError: if neither ``self.hparams.optim`` nor ``self.lowmem_optim_config`` is set.
        """
        cfg = self._lowmem_hparam()
        if cfg is None:
            cfg = getattr(self, CONFIG_ATTRIBUTE, None)
        if cfg is None:
            raise ValueError(
                f"{type(self).__name__} has no optimizer config for LowMemOptimizerMixin. Either give the "
                f"model an `{HPARAMS_KEY}` argument and call self.save_hyperparameters() in __init__ (it is read "
                f"from self.hparams.{HPARAMS_KEY}; with LightningCLI: --model.{HPARAMS_KEY}.name=adam_mini), set "
                f"self.{CONFIG_ATTRIBUTE} = OptimConfig(...) (or a dict) in __init__, or set "
                f"self.{FACTORY_ATTRIBUTE} = AdamMini (or LightningCLI's OptimizerCallable) to build it from the module. "
                f"Optimizers: {', '.join(available_optimizers())}."
            )
        return OptimConfig.from_any(cfg)

    def _lowmem_hparam(self) -> Any:
        hparams = getattr(self, "hparams", None)
        return hparams.get(HPARAMS_KEY) if hparams is not None and hasattr(hparams, "get") else None

    def _lowmem_factory(self) -> Callable[[Any], Optimizer] | None:
        """``self.lowmem_optimizer`` unless ``self.hparams.optim`` comes first.

        Raises:
            TypeError: if it is set but not callable.
        """
        factory = getattr(self, FACTORY_ATTRIBUTE, None)
        if factory is None or self._lowmem_hparam() is not None:
            return None
        if not callable(factory):
            raise TypeError(
                f"self.{FACTORY_ATTRIBUTE} must be a callable taking the module and returning an optimizer "
                f"(e.g. AdamMini, functools.partial(Eve, lr=3e-4), LightningCLI's OptimizerCallable), got {factory!r}; "
                f"put configs in self.{CONFIG_ATTRIBUTE}."
            )
        return factory

    def _lowmem_call_factory(self, factory: Callable[[Any], Optimizer]) -> Optimizer:
        try:
            optimizer = factory(self)
        except TypeError as err:
            raise TypeError(
                f"{type(self).__name__}.{FACTORY_ATTRIBUTE} is called with the module itself, and refused it: {err}. "
                "Use an optimizer that takes a model (lightning_lowmem.AdamMini, Eve, MicroAdam, or "
                "lightning_lowmem.optim.NamedAdamW for AdamW), or a callable that takes the module."
            ) from err
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__}.{FACTORY_ATTRIBUTE} returned {type(optimizer).__name__}, not a "
                "torch.optim.Optimizer."
            )
        return optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        """Build the optimizer and (unless ``"none"``) its per-step scheduler from the config.

        Returns:
            ``{"optimizer": optimizer}``, plus ``"lr_scheduler": {"scheduler": ..., "interval": "step",
            "frequency": 1}`` when the config has a schedule.

        Raises:
            ValueError: see the class docstring.
        """
        factory = self._lowmem_factory()
        if factory is not None:
            optimizer = self._lowmem_call_factory(factory)
            self._lowmem_adopt(optimizer, "from self.lowmem_optimizer")
            return {"optimizer": optimizer}
        cfg = self.resolve_lowmem_config()
        optimizer = create_optimizer(self, cfg)  # type: ignore[arg-type]  # the mixin is on an nn.Module
        self._lowmem_adopt(optimizer, f"({cfg.name})")
        if cfg.scheduler.name == "none":
            return {"optimizer": optimizer}
        total_steps = cfg.scheduler.total_steps or self._lowmem_estimated_steps()
        scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _lowmem_adopt(self, optimizer: Optimizer, origin: str) -> None:
        """Bind the module to the optimizer (names for groups added later), keep and log its plan."""
        if isinstance(optimizer, ModelNamedGroups):
            optimizer.bind_model(self)  # type: ignore[arg-type]  # the mixin is on an nn.Module
        self.lowmem_plan = plan_of(optimizer)
        if self.lowmem_plan is not None:
            lr = optimizer.param_groups[0]["lr"]
            rank_zero_info(f"{type(optimizer).__name__} {origin}, lr={float(lr):g}:\n{self.lowmem_plan}")

    def _lowmem_estimated_steps(self) -> int:
        """``trainer.estimated_stepping_batches`` as an int.

        Raises:
            ValueError: if there is no trainer or the estimate is not finite.
        """
        try:
            trainer = self.trainer  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        if trainer is None:
            raise ValueError(
                f"{type(self).__name__} is not attached to a Trainer, so the schedule's length is unknown: "
                "set scheduler.total_steps in the optimizer config."
            )
        estimate = trainer.estimated_stepping_batches
        if not math.isfinite(estimate):
            raise ValueError(
                f"The Trainer's estimated_stepping_batches is {estimate}, so the schedule cannot end: set "
                "scheduler.total_steps in the optimizer config, or Trainer(max_steps=...) / max_epochs."
            )
        return int(estimate)
