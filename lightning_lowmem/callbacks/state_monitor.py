"""``OptimizerStateMonitor``: how much memory the optimizer state takes, and how much it saves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_lowmem.callbacks._logging import PREFIX, Layout, LowMemCallback, check_positive_int, log_scalars, log_text
from lightning_lowmem.callbacks._state_memory import StateMemory, measure_state_memory, peak_memory_bytes
from lightning_lowmem.optim import MicroAdam
from lightning_lowmem.optim.registry import plan_of

if TYPE_CHECKING:
    import lightning.pytorch as pl

TAG = f"{PREFIX}/state"


class OptimizerStateMonitor(LowMemCallback):
    """Logs the optimizer state's memory: per rank and in total, by block kind, against fp32 AdamW.

    After the first optimizer step of a fit (when the state exists) and then every ``every_n_steps``
    steps, at ``step = trainer.global_step`` (optimizer steps taken), under ``lowmem/state/``:

    * ``total_bytes`` and ``total_bytes/<kind>``: the state's logical size, the shards of all ranks
      and every replicated tensor once (what one device would hold);
    * ``rank_bytes`` and ``rank_bytes/<kind>``: bytes held by the fullest rank (and
      ``rank_bytes_min`` by the emptiest, with several ranks);
    * ``bytes_per_param``: total bytes per trainable parameter;
    * ``adamw_bytes``, ``saving_bytes``, ``saving_percent``: fp32 AdamW's state for the same
      parameters (8 bytes each), and the saving against it;
    * ``peak_memory_bytes``: the fullest rank's peak device memory: the CUDA allocator's peak on a
      GPU, the process's peak RSS on CPU.

    ``<kind>`` is the parameter's block kind in the optimizer's plan (``full``, ``row``, ``head``,
    ``tensor``, ``mixed``), ``compressed`` for MicroAdam's compressed parameters, ``full`` for any
    other optimizer. Bytes are counted from the state tensors themselves, each piece of memory once
    (:func:`lightning_lowmem.utils.tensors_bytes`), so the numbers are right for AdamW, AdamMini,
    Eve, MicroAdam and any ``torch.optim.Optimizer``. Once, the block plan (or MicroAdam's summary)
    and the measured table are written as TensorBoard text (``lowmem/state/plan``).

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
        self.last = memory = measure_state_memory(trainer.optimizers, peak_memory=peak_memory_bytes(pl_module.device))
        log_scalars(trainer, self._metrics(memory), step)
        if self.log_plan and not self._plan_logged:
            self._plan_logged = True
            log_text(trainer, f"{TAG}/plan", self._plan_text(trainer, memory), step)

    @staticmethod
    def _metrics(memory: StateMemory) -> dict[str, float]:
        metrics = {
            f"{TAG}/total_bytes": memory.total_bytes,
            f"{TAG}/rank_bytes": max(memory.rank_bytes),
            f"{TAG}/bytes_per_param": memory.bytes_per_param,
            f"{TAG}/adamw_bytes": memory.adamw_bytes,
            f"{TAG}/saving_bytes": memory.saving_bytes,
            f"{TAG}/saving_percent": memory.saving_percent,
            f"{TAG}/peak_memory_bytes": max(memory.peak_memory),
        }
        if len(memory.rank_bytes) > 1:
            metrics[f"{TAG}/rank_bytes_min"] = min(memory.rank_bytes)
        for kind in memory.kinds:
            metrics[f"{TAG}/total_bytes/{kind}"] = memory.total_bytes_by_kind[kind]
            metrics[f"{TAG}/rank_bytes/{kind}"] = max(memory.rank_bytes_by_kind[kind])
        return metrics

    @staticmethod
    def _plan_text(trainer: pl.Trainer, memory: StateMemory) -> str:
        parts = []
        for optimizer in trainer.optimizers:
            plan = plan_of(optimizer)
            if plan is not None:
                parts.append((f"{type(optimizer).__name__} block plan", plan.summary()))
            elif isinstance(optimizer, MicroAdam):
                parts.append(("MicroAdam state", optimizer.summary()))
        names = ", ".join(type(o).__name__ for o in trainer.optimizers)
        parts.append((f"Measured state ({names}, {len(memory.rank_bytes)} rank(s))", memory.table()))
        return "\n\n".join(f"**{title}**\n\n" + "\n".join("    " + line for line in text.splitlines()) for title, text in parts)

    def charts(self, trainer: pl.Trainer) -> Layout:
        return {
            f"{PREFIX}: optimizer state": {
                "state bytes, total and by kind": ["Multiline", [rf"^{TAG}/total_bytes(/.*)?$", rf"^{TAG}/adamw_bytes$"]],
                "state bytes of a rank": ["Multiline", [rf"^{TAG}/rank_bytes.*"]],
                "bytes per parameter": ["Multiline", [rf"^{TAG}/bytes_per_param$"]],
                "saving vs fp32 AdamW (%)": ["Multiline", [rf"^{TAG}/saving_percent$"]],
                "saving vs fp32 AdamW (bytes)": ["Multiline", [rf"^{TAG}/saving_bytes$"]],
                "peak memory (bytes)": ["Multiline", [rf"^{TAG}/peak_memory_bytes$"]],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {"plan_logged": self._plan_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._plan_logged = bool(state_dict.get("plan_logged", False))
