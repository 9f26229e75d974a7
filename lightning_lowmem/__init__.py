"""lightning_lowmem: low-memory optimizers for PyTorch Lightning.

Adam-mini, Eve and MicroAdam as ``torch.optim.Optimizer`` subclasses, a block partitioner that reads
a model's structure, and a mixin that builds them from a config.
"""

from lightning_lowmem.config import OptimConfig, SchedulerConfig
from lightning_lowmem.module import LowMemOptimizerMixin
from lightning_lowmem.optim import AdamMini, BlockAdam, Eve, MicroAdam
from lightning_lowmem.partition import BlockPlan, BlockSpec, build_plan
from lightning_lowmem.strategies import LowMemFSDPStrategy  # registers Trainer(strategy="lowmem_fsdp")

__version__ = "0.1.0"

__all__ = [
    "AdamMini",
    "BlockAdam",
    "BlockPlan",
    "BlockSpec",
    "Eve",
    "MicroAdam",
    "LowMemFSDPStrategy",
    "LowMemOptimizerMixin",
    "OptimConfig",
    "SchedulerConfig",
    "build_plan",
]
