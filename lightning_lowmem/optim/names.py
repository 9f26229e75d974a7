"""The table of optimizer names a config can use: ``name -> factory(model, cfg) -> Optimizer``.

Filled by :func:`register_optimizer`, where each optimizer is defined (the built-in ones in
:mod:`lightning_lowmem.optim.registry`, imported by :func:`available_optimizers` the first time a
name is looked up). It sits below both :mod:`lightning_lowmem.config` (which validates names
against it) and the registry (which builds optimizers from configs), so neither imports the
other's module back.

Example::

    >>> @register_optimizer("sgd")
    ... def _sgd(model, cfg):
    ...     return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    >>> "sgd" in available_optimizers()
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn
from torch.optim import Optimizer

#: ``(model, cfg: OptimConfig) -> Optimizer``.
OptimizerFactory = Callable[[nn.Module, Any], Optimizer]
_Factory = TypeVar("_Factory", bound=OptimizerFactory)

#: The registered optimizer factories by name, in registration order.
OPTIMIZERS: dict[str, OptimizerFactory] = {}
#: The module whose import registers the built-in optimizers.
BUILTIN_MODULE = "lightning_lowmem.optim.registry"


def register_optimizer(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator adding a factory ``(model, cfg: OptimConfig) -> Optimizer`` to :data:`OPTIMIZERS`.

    Args:
        name: the name configs use to pick the optimizer.

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        ValueError: if ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"An optimizer name must be a non-empty string, got {name!r}.")

    def decorator(factory: _Factory) -> _Factory:
        if name in OPTIMIZERS:
            owner = OPTIMIZERS[name]
            raise ValueError(
                f"An optimizer named {name!r} is already registered ({owner.__module__}.{owner.__qualname__}); "
                "register yours under another name."
            )
        OPTIMIZERS[name] = factory
        return factory

    return decorator


def available_optimizers() -> tuple[str, ...]:
    """The registered optimizer names, in registration order (the built-in ones first: they are
    registered here if nothing has imported them yet)."""
    importlib.import_module(BUILTIN_MODULE)
    return tuple(OPTIMIZERS)
