"""lightning_lowmem: low-memory optimizers for PyTorch Lightning.

Adam-mini, Eve and MicroAdam as ``torch.optim.Optimizer`` subclasses, a block partitioner that reads
a model's structure, and a mixin that builds them from a config.

Importing the package is cheap: the public names below load their modules (and torch) on first
use, so that the ``lowmem`` command answers ``--help`` without importing torch or Lightning. The
``"lowmem_fsdp"`` strategy is registered with Lightning as soon as both this package and
``lightning.pytorch`` are imported, in either order: ``import lightning_lowmem`` is all
``Trainer(strategy="lowmem_fsdp")`` needs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_lowmem.config import OptimConfig, SchedulerConfig
    from lightning_lowmem.module import LowMemOptimizerMixin
    from lightning_lowmem.optim import AdamMini, BlockAdam, Eve, MicroAdam
    from lightning_lowmem.partition import BlockPlan, BlockSpec, build_plan
    from lightning_lowmem.strategies import LowMemFSDPStrategy

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "AdamMini": "lightning_lowmem.optim",
    "BlockAdam": "lightning_lowmem.optim",
    "BlockPlan": "lightning_lowmem.partition",
    "BlockSpec": "lightning_lowmem.partition",
    "Eve": "lightning_lowmem.optim",
    "MicroAdam": "lightning_lowmem.optim",
    "LowMemFSDPStrategy": "lightning_lowmem.strategies",
    "LowMemOptimizerMixin": "lightning_lowmem.module",
    "OptimConfig": "lightning_lowmem.config",
    "SchedulerConfig": "lightning_lowmem.config",
    "build_plan": "lightning_lowmem.partition",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_lowmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# ---- registering "lowmem_fsdp" with Lightning ----------------------------------------------------

_LIGHTNING = "lightning.pytorch"


def _register_strategy() -> None:
    importlib.import_module("lightning_lowmem.strategies")  # registers on import


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Registers the strategy right after ``lightning.pytorch`` has finished importing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _LIGHTNING:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            loader.exec_module = exec_module
            _register_strategy()

        loader.exec_module = exec_then_register
        return spec


if _LIGHTNING in sys.modules:
    _register_strategy()
elif not any(isinstance(finder, _RegisterAfterLightning) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLightning())
