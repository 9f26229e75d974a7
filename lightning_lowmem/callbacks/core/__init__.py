"""The measurements behind the ``lowmem`` callbacks, without Lightning: usable from any training loop.

Each callback of :mod:`lightning_lowmem.callbacks` is a thin Lightning adapter over one of these
(``examples/compare_optimizers.py`` uses them from a plain PyTorch loop):

* :mod:`~lightning_lowmem.callbacks.core.kinds`: what state each parameter holds, asked of the
  optimizer through one protocol, :class:`DescribesState` (``state_segments()`` and ``summary()``);
* :mod:`~lightning_lowmem.callbacks.core.state_memory`: optimizer state bytes by block kind, per
  rank and in total (:func:`measure_state_memory`);
* :mod:`~lightning_lowmem.callbacks.core.distance`: distance of weights to AdamW's trajectory
  (:func:`weight_distance`, snapshots, :class:`ShadowAdamW`);
* :mod:`~lightning_lowmem.callbacks.core.spike_stats`: loss-spike detection from moving statistics
  (:class:`SpikeDetector`);
* :mod:`~lightning_lowmem.callbacks.core.diagnostics`: relative learning rates per block kind and
  update/weight ratios (:func:`relative_lr_samples`, :func:`update_ratios`);
* :mod:`~lightning_lowmem.callbacks.core.reduce`: sums and gathers over FSDP2 meshes that count each
  piece of a ``DTensor`` once.

Under FSDP2 the functions that say so are collectives: every rank must call them.

Example::

    >>> from lightning_lowmem.callbacks.core import measure_state_memory, weight_distance, param_kinds
    >>> memory = measure_state_memory(optimizer)
    >>> print(memory.table())                    # state MB by block kind against fp32 AdamW
    >>> kinds = {name: param_kinds(optimizer)[p] for name, p in model.named_parameters()}
    >>> weight_distance(dict(model.named_parameters()), adamw_weights, kinds).rel_l2
"""

from lightning_lowmem.callbacks.core.diagnostics import (
    layer_group,
    quantile_names,
    quantiles_of,
    relative_lr_samples,
    update_ratios,
    weights_by_group,
)
from lightning_lowmem.callbacks.core.distance import (
    Distance,
    ShadowAdamW,
    check_same_parameters,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_path,
    weight_distance,
)
from lightning_lowmem.callbacks.core.kinds import (
    KIND_ORDER,
    DescribesState,
    Segment,
    kinds_present,
    param_kind,
    param_kinds,
    parameter_names,
    state_segments,
    state_summary,
)
from lightning_lowmem.callbacks.core.reduce import gather_over_mesh, is_sharded, mesh_of, owned_part, sum_over_mesh
from lightning_lowmem.callbacks.core.spike_stats import MONITORS, EmaStats, SpikeDecision, SpikeDetector
from lightning_lowmem.callbacks.core.state_memory import MB, StateMemory, measure_state_memory, peak_memory_bytes

__all__ = [
    "KIND_ORDER",
    "MB",
    "MONITORS",
    "DescribesState",
    "Distance",
    "EmaStats",
    "Segment",
    "ShadowAdamW",
    "SpikeDecision",
    "SpikeDetector",
    "StateMemory",
    "check_same_parameters",
    "gather_over_mesh",
    "is_sharded",
    "kinds_present",
    "layer_group",
    "list_snapshots",
    "load_snapshot",
    "measure_state_memory",
    "mesh_of",
    "owned_part",
    "param_kind",
    "param_kinds",
    "parameter_names",
    "peak_memory_bytes",
    "quantile_names",
    "quantiles_of",
    "relative_lr_samples",
    "save_snapshot",
    "snapshot_path",
    "state_segments",
    "state_summary",
    "sum_over_mesh",
    "update_ratios",
    "weight_distance",
    "weights_by_group",
]
