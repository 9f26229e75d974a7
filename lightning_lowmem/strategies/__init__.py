"""Lightning strategies: ``LowMemFSDPStrategy`` (FSDP2), registered as ``Trainer(strategy="lowmem_fsdp")``."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_lowmem.strategies.checkpoint import check_optimizer_state
from lightning_lowmem.strategies.compatibility import load_weights
from lightning_lowmem.strategies.fsdp import LowMemFSDPStrategy
from lightning_lowmem.strategies.integrity import CheckpointError, mark_complete, verify_checkpoint
from lightning_lowmem.strategies.loss_guard import NonFiniteLossError
from lightning_lowmem.strategies.sharding import auto_shard, clip_grad_norm_, find_blocks, total_grad_norm

LowMemFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "CheckpointError",
    "LowMemFSDPStrategy",
    "NonFiniteLossError",
    "auto_shard",
    "check_optimizer_state",
    "clip_grad_norm_",
    "find_blocks",
    "load_weights",
    "mark_complete",
    "total_grad_norm",
    "verify_checkpoint",
]
