"""``OptimizerStateMonitor``: how much memory the optimizer state takes, and how much it saves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_lowmem.callbacks._logging import (
    PREFIX,
    Layout,
    LowMemCallback,
    check_positive_int,
    log_scalars,
    log_series,
    log_text,
)
from lightning_lowmem.callbacks.core.kinds import state_summary
from lightning_lowmem.callbacks.core.state_memory import MB, StateMemory, measure_state_memory, peak_memory_bytes

if TYPE_CHECKING:
    import lightning.pytorch as pl

TAG = f"{PREFIX}/state"


class OptimizerStateMonitor(LowMemCallback):
    """Logs the optimizer state's memory: per rank and in total, by block kind, against fp32 AdamW.

    After the first optimizer step of a fit (when the state exists), every ``every_n_steps`` steps
    and after the last step, at ``step = trainer.global_step`` (optimizer steps taken), under
    ``lowmem/state/``, in MB (1e6 bytes):

    * ``total_mb``: the state's logical size, the shards of all ranks and every replicated tensor
      once (what one device would hold);
    * ``mb_by_kind``: the same by block kind, one series per kind;
    * ``saving_percent``: the saving against fp32 AdamW's state for the same parameters (8 bytes
      each);
    * ``bytes_per_param``: total bytes per trainable parameter;
    * ``rank_mb`` and ``rank_min_mb`` (with several ranks): the fullest and the emptiest rank's state;
    * ``peak_memory_mb``: the fullest rank's peak device memory: the CUDA allocator's peak on a
      GPU, the process's peak RSS on CPU.

    A kind is the block kind of the optimizer's plan (``full``, ``row``, ``head``, ``tensor``; a
    fused projection is counted by its segments, as the plan's table counts it), ``compressed`` for
    MicroAdam's compressed parameters, ``full`` for any other optimizer (see
    :mod:`lightning_lowmem.callbacks.core.kinds`). Bytes are counted from the state tensors
    themselves, each piece of memory once (:func:`lightning_lowmem.utils.tensors_bytes`), so the
    numbers are right for AdamW, AdamMini, Eve, MicroAdam and any ``torch.optim.Optimizer``. Once,
    the optimizer's own table (the block plan, or MicroAdam's summary) and the measured table are
    written as TensorBoard text (``lowmem/state/plan``).

    Under FSDP every rank must run this callback (each measurement is one all-gather).

    Args:
        every_n_steps: optimizer steps between measurements.
        log_plan: write the plan and the measured table once as text.

    Raises:
        ValueError: if ``every_n_steps`` is not an int >= 1.
        MisconfigurationException: if the ``Trainer`` has no logger.

    Example::

        >>> from lightning_lowmem.callbacks import OptimizerStateMonitor
        >>> trainer = Trainer(logger=TensorBoardLogger("runs"), callbacks=[OptimizerStateMonitor(every_n_steps=100)])
    """

    def __init__(self, every_n_steps: int = 100, log_plan: bool = True) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.log_plan = log_plan
        self.last: StateMemory | None = None
        self._plan_logged = False
        self._measured_in_fit = False
        self._last_step: int | None = None
        self._measured_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._measured_in_fit = False
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step on this batch
            return
        self._last_step = step
        if self._measured_in_fit and step % self.every_n_steps:
            return
        self._measured_in_fit = True
        self._measure(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._measured_in_fit and self._measured_step != trainer.global_step:
            self._measure(trainer, pl_module, trainer.global_step)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._measured_step = step
        self.last = memory = measure_state_memory(trainer.optimizers, peak_memory=peak_memory_bytes(pl_module.device))
        log_scalars(trainer, self._metrics(memory), step)
        log_series(trainer, f"{TAG}/mb_by_kind", {k: memory.total_bytes_by_kind[k] / MB for k in memory.kinds}, step)
        if self.log_plan and not self._plan_logged:
            self._plan_logged = True
            log_text(trainer, f"{TAG}/plan", self._plan_text(trainer, memory), step)

    @staticmethod
    def _metrics(memory: StateMemory) -> dict[str, float]:
        metrics = {
            f"{TAG}/total_mb": memory.total_mb,
            f"{TAG}/saving_percent": memory.saving_percent,
            f"{TAG}/bytes_per_param": memory.bytes_per_param,
            f"{TAG}/peak_memory_mb": max(memory.peak_memory) / MB,
        }
        if len(memory.rank_bytes) > 1:
            metrics[f"{TAG}/rank_mb"] = max(memory.rank_bytes) / MB
            metrics[f"{TAG}/rank_min_mb"] = min(memory.rank_bytes) / MB
        return metrics

    @staticmethod
    def _plan_text(trainer: pl.Trainer, memory: StateMemory) -> str:
        parts = []
        for optimizer in trainer.optimizers:
            summary = state_summary(optimizer)
            if summary is not None:
                parts.append((f"{type(optimizer).__name__} state layout", summary))
        names = ", ".join(type(o).__name__ for o in trainer.optimizers)
        parts.append((f"Measured state ({names}, {len(memory.rank_bytes)} rank(s))", memory.table()))
        return "\n\n".join(f"**{title}**\n\n" + "\n".join("    " + line for line in text.splitlines()) for title, text in parts)

    def charts(self, trainer: pl.Trainer) -> Layout:
        return {
            f"{PREFIX}: optimizer state": {
                "state MB": ["Multiline", [rf"^{TAG}/total_mb$"]],
                "state MB by block kind": ["Multiline", [rf"^{TAG}/mb_by_kind$"]],
                "saving vs fp32 AdamW (%)": ["Multiline", [rf"^{TAG}/saving_percent$"]],
                "bytes per parameter (fp32 AdamW: 8)": ["Multiline", [rf"^{TAG}/bytes_per_param$"]],
                "state MB of the fullest and the emptiest rank": ["Multiline", [rf"^{TAG}/rank(_min)?_mb$"]],
                "peak memory MB": ["Multiline", [rf"^{TAG}/peak_memory_mb$"]],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {"plan_logged": self._plan_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._plan_logged = bool(state_dict.get("plan_logged", False))
