"""Lightning strategies: ``LowMemFSDPStrategy`` (FSDP2), registered as ``Trainer(strategy="lowmem_fsdp")``."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_lowmem.strategies.checkpoint import check_optimizer_state
from lightning_lowmem.strategies.fsdp import LowMemFSDPStrategy
from lightning_lowmem.strategies.sharding import auto_shard, clip_grad_norm_, find_blocks, total_grad_norm

LowMemFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "LowMemFSDPStrategy",
    "auto_shard",
    "check_optimizer_state",
    "clip_grad_norm_",
    "find_blocks",
    "total_grad_norm",
]
