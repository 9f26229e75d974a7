"""Low-memory optimizers: ``torch.optim.Optimizer`` subclasses over shared functional cores."""

from lightning_lowmem.optim.adam_mini import AdamMini
from lightning_lowmem.optim.adamw import NamedAdamW
from lightning_lowmem.optim.block_adam import BlockAdam
from lightning_lowmem.optim.eve import Eve
from lightning_lowmem.kernels.block_adam import block_adam_update_, block_mean_sq
from lightning_lowmem.kernels.layout import RowLayout
from lightning_lowmem.optim.functional import block_adam
from lightning_lowmem.optim.micro_adam import MicroAdam

__all__ = ["AdamMini", "BlockAdam", "Eve", "MicroAdam", "NamedAdamW", "RowLayout", "block_adam", "block_adam_update_", "block_mean_sq"]
