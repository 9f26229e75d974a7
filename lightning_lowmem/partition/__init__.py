"""Which parameters share a second moment: block specs, presets, and the plan builder.

Pure functions over a model's structure and global parameter shapes; nothing here touches an
optimizer, so the plan can be built on the meta device, on FSDP2 DTensors, or for a model that is
only described by a config.
"""

from lightning_lowmem.partition.build import PRESETS, build_plan, build_plan_from_named_parameters
from lightning_lowmem.partition.plan import ADAMW_STATE_BYTES_PER_PARAM, BlockPlan
from lightning_lowmem.partition.spec import KINDS, BlockSpec, ParamBlocks
from lightning_lowmem.partition.structure import NO_DECAY_ROLES

__all__ = [
    "ADAMW_STATE_BYTES_PER_PARAM",
    "KINDS",
    "NO_DECAY_ROLES",
    "PRESETS",
    "BlockPlan",
    "BlockSpec",
    "ParamBlocks",
    "build_plan",
    "build_plan_from_named_parameters",
]
