"""Lightning callbacks that show what a low-memory optimizer saves and costs, in TensorBoard.

Each is a thin adapter over a framework-free core (:mod:`lightning_lowmem.callbacks.core`, usable
without Lightning) and logs under ``lowmem/``, in MB where it counts bytes:

* :class:`OptimizerStateMonitor`: optimizer state bytes per rank and in total, by block kind,
  against fp32 AdamW, and peak memory;
* :class:`TrajectoryDistance`: distance of the weights to AdamW's trajectory (recorded, or a shadow);
* :class:`LossSpikeMonitor`: loss-spike detection before the update, the same on every rank, with
  ``log``/``skip``/``lr_backoff``/``raise`` actions;
* :class:`OptimizerDiagnostics`: effective per-block learning rates, update/weight ratios, gradient
  norm, and one custom-scalars layout for all of them.

Example::

    >>> from lightning_lowmem.callbacks import LossSpikeMonitor, OptimizerDiagnostics, OptimizerStateMonitor
    >>> trainer = Trainer(logger=TensorBoardLogger("runs"),
    ...                   callbacks=[OptimizerStateMonitor(), LossSpikeMonitor(), OptimizerDiagnostics()])
"""

from lightning_lowmem.callbacks.core import (
    Distance,
    ShadowAdamW,
    SpikeDecision,
    SpikeDetector,
    StateMemory,
    measure_state_memory,
    weight_distance,
)
from lightning_lowmem.callbacks.diagnostics import OptimizerDiagnostics
from lightning_lowmem.callbacks.spikes import LossSpikeError, LossSpikeMonitor
from lightning_lowmem.callbacks.state_monitor import OptimizerStateMonitor
from lightning_lowmem.callbacks.trajectory import TrajectoryDistance

__all__ = [
    "Distance",
    "LossSpikeError",
    "LossSpikeMonitor",
    "OptimizerDiagnostics",
    "OptimizerStateMonitor",
    "ShadowAdamW",
    "SpikeDecision",
    "SpikeDetector",
    "StateMemory",
    "TrajectoryDistance",
    "measure_state_memory",
    "weight_distance",
]
