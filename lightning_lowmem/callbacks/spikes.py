"""``LossSpikeMonitor``: find loss spikes before the bad update lands, and act on them on every rank alike."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.spike import TrainingSpikeException
from torch.optim import Optimizer

from lightning_lowmem.callbacks._logging import (
    PREFIX,
    Layout,
    LowMemCallback,
    check_positive_int,
    log_scalars,
    log_series,
    log_text,
)
from lightning_lowmem.callbacks.core.spike_stats import MONITORS, SpikeDecision, SpikeDetector
from lightning_lowmem.optim.hparams import check_choice
from lightning_lowmem.strategies.sharding import total_grad_norm

if TYPE_CHECKING:
    import lightning.pytorch as pl

TAG = f"{PREFIX}/spikes"
ACTIONS = ("log", "skip", "lr_backoff", "raise")
#: Events kept in the callback's state (the count is kept in full).
MAX_EVENTS_KEPT = 100


class LossSpikeError(TrainingSpikeException):
    """Raised by :class:`LossSpikeMonitor` for ``action="raise"``, or after too many consecutive spikes."""

    def __init__(self, message: str, batch_idx: int) -> None:
        RuntimeError.__init__(self, message)
        self.batch_idx = batch_idx


class LossSpikeMonitor(LowMemCallback):
    r"""Detects loss spikes before the optimizer step, with the same decision on every rank, and acts on them.

    Lightning's ``SpikeDetection`` looks at the loss after the update has landed, decides per rank
    and can only raise. This callback decides in ``on_before_optimizer_step``, from

    * the loss averaged over all micro-batches of the step (gradient accumulation) and all ranks
      (one all-reduce), and
    * the global gradient norm (FSDP2 ``DTensor`` gradients are reduced across ranks),

    against exponential moving statistics of both (z-score, with warmup and an optional ratio test;
    see :mod:`lightning_lowmem.callbacks.core.spike_stats`). Spikes are kept out of the statistics. A
    NaN or infinite loss or gradient norm is always a spike, warmup or not. The decision is also
    combined across ranks (``reduce_boolean_decision``, any rank), so all ranks act alike. Then:

    * ``"log"``: only log it;
    * ``"skip"``: skip the update: every gradient is set to ``None`` so the optimizer leaves the
      weights *and* its state untouched (zeroed gradients would not do: Adam's momentum and weight
      decay would still move the weights). The scheduler and ``global_step`` still advance;
    * ``"lr_backoff"``: this update and the next ``backoff_steps - 1`` run at ``backoff_factor``
      times the learning rate (the schedule's value is restored right after each step, before the
      scheduler runs); a spike during a backoff starts it again;
    * ``"raise"``: append the step's batch indices to a JSON list (like Lightning's
      ``skip_batches.json``) and raise :class:`LossSpikeError` (a ``TrainingSpikeException``).

    With ``skip_nonfinite`` (default) a non-finite step is skipped whatever the action (except
    ``"raise"``), so a NaN never reaches the weights. Each spike is logged at
    ``step = trainer.global_step`` (the index of the update it would have been, the step Lightning
    logs that batch's loss at) as scalars ``lowmem/spikes/{count,loss,grad_norm,z}`` and as a text
    line in ``lowmem/spikes/events``; every ``trainer.log_every_n_steps`` steps the running count and
    the z-scores (``lowmem/spikes/zscore``, one series per monitor) are logged too.

    The hooks run collectives (the loss all-reduce, the gradient norm under FSDP, the decision):
    every rank must run this callback.

    Args:
        action: ``"log"``, ``"skip"``, ``"lr_backoff"`` or ``"raise"``.
        monitor: which values to test: ``"loss"``, ``"grad_norm"`` or both.
        threshold: z-score above which a value is a spike.
        decay: decay of the moving mean and variance (they follow about ``1 / (1 - decay)`` steps).
        warmup: steps that enter the statistics before z-scores are tested.
        min_ratio: if set, a value is only a spike if it is also above ``min_ratio`` times its mean.
        backoff_factor: learning-rate factor of ``"lr_backoff"``, in ``(0, 1)``.
        backoff_steps: updates run at the reduced learning rate after a spike.
        skip_nonfinite: skip a step with a non-finite loss or gradient norm whatever the action.
        max_consecutive: raise :class:`LossSpikeError` after this many consecutive spikes (the loss
            level has changed for good, and the statistics, which spikes do not enter, would flag
            every step from now on); ``None`` never raises for that.
        exclude_batches_path: the JSON file of ``"raise"`` (a directory gets ``skip_batches.json``);
            default ``<trainer.default_root_dir>/skip_batches.json``.

    Raises:
        ValueError: for an unknown ``action`` or ``monitor``, or a setting out of range.
        MisconfigurationException: if the ``Trainer`` has no logger.
        RuntimeError: at the start of training, if the model has more than one optimizer.

    Example::

        >>> from lightning_lowmem.callbacks import LossSpikeMonitor
        >>> trainer = Trainer(callbacks=[LossSpikeMonitor(action="skip", threshold=6.0, warmup=50)])
    """

    def __init__(
        self,
        action: str = "skip",
        monitor: Sequence[str] | str = MONITORS,
        threshold: float = 6.0,
        decay: float = 0.99,
        warmup: int = 50,
        min_ratio: float | None = None,
        backoff_factor: float = 0.1,
        backoff_steps: int = 100,
        skip_nonfinite: bool = True,
        max_consecutive: int | None = 50,
        exclude_batches_path: str | os.PathLike | None = None,
    ) -> None:
        check_choice("action", action, ACTIONS)
        monitor = (monitor,) if isinstance(monitor, str) else tuple(monitor)
        self.detector = SpikeDetector(monitor, threshold=threshold, decay=decay, warmup=warmup, min_ratio=min_ratio)
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}.")
        check_positive_int("backoff_steps", backoff_steps)
        if max_consecutive is not None:
            check_positive_int("max_consecutive", max_consecutive)
        self.action = action
        self.backoff_factor = backoff_factor
        self.backoff_steps = backoff_steps
        self.skip_nonfinite = skip_nonfinite
        self.max_consecutive = max_consecutive
        self.exclude_batches_path = exclude_batches_path
        self.count = 0
        self.consecutive = 0
        self.backoff_remaining = 0
        self.events: list[dict[str, Any]] = []
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._batch_indices: list[int] = []
        self._restore: list[tuple[dict[str, Any], Any]] = []
        self._hook: Any = None

    @property
    def handles_nonfinite_loss(self) -> bool:
        """Whether this monitor keeps a non-finite step from the weights itself (``skip_nonfinite``,
        or ``action="raise"``); ``lowmem_fsdp``'s own non-finite check then leaves the step to it."""
        return self.skip_nonfinite or self.action == "raise"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action, monitor=self.detector.monitors)

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"LossSpikeMonitor works with one optimizer; this model has {len(trainer.optimizers)} "
                f"({', '.join(type(o).__name__ for o in trainer.optimizers) or 'none'})."
            )
        self._reset_step()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_indices.append(batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().to(torch.float64)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        values = self._measure(trainer, pl_module, optimizer)
        decision = self.detector.check(values)
        is_spike = trainer.strategy.reduce_boolean_decision(decision.is_spike, all=False)
        step = trainer.global_step
        skip = False
        if is_spike:
            skip = self._on_spike(trainer, optimizer, decision, step)
        else:
            self.consecutive = 0
        self.detector.update(values, is_spike)
        if not skip and self.backoff_remaining > 0:
            self._scale_lr(optimizer)
        if step % trainer.log_every_n_steps == 0:
            log_scalars(trainer, {f"{TAG}/count": self.count}, step)
            # a z-score needs two earlier values (a mean and a spread): none at the first steps
            zscores = {m: z for m, z in decision.zscores.items() if math.isfinite(z) and self.detector.stats[m].count > 2}
            log_series(trainer, f"{TAG}/zscore", zscores, step)
        self._reset_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_lr()
        self._remove_hook()

    # ---- measuring and acting ------------------------------------------------------------------

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        if "loss" in self.detector.monitors:
            # on_before_backward sees the loss divided by accumulate_grad_batches (automatic optimization)
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            loss_sum = self._loss_sum if self._loss_sum is not None else torch.zeros((), dtype=torch.float64, device=pl_module.device)
            local = torch.stack([loss_sum * scale, torch.tensor(float(self._loss_count), dtype=torch.float64, device=loss_sum.device)])
            total, count = trainer.strategy.reduce(local, reduce_op="sum").tolist()
            values["loss"] = total / count if count else None
        if "grad_norm" in self.detector.monitors:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            values["grad_norm"] = float(total_grad_norm(params))
        return values

    def _on_spike(self, trainer: pl.Trainer, optimizer: Optimizer, decision: SpikeDecision, step: int) -> bool:
        """Record and act on a spike; returns whether the update is skipped."""
        self.count += 1
        self.consecutive += 1
        if self.action == "raise":
            taken = "raise"
        elif decision.nonfinite and self.skip_nonfinite:
            taken = "skip"
        else:
            taken = self.action
        event = {
            "step": step,
            "epoch": trainer.current_epoch,
            "batch_indices": list(self._batch_indices),
            "loss": decision.values.get("loss"),
            "grad_norm": decision.values.get("grad_norm"),
            "z": decision.max_z,
            "reason": decision.reason or "spike on another rank",
            "action": taken,
        }
        self.events = [*self.events, event][-MAX_EVENTS_KEPT:]
        self._log_event(trainer, event)
        batch_idx = self._batch_indices[-1] if self._batch_indices else -1
        if taken == "raise":
            path = self._write_exclude_batches(trainer, event["batch_indices"])
            raise LossSpikeError(
                f"Loss spike at step {step} (batches {event['batch_indices']}): {event['reason']}. "
                f"Its batch indices were added to {path}.",
                batch_idx,
            )
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise LossSpikeError(
                f"{self.consecutive} consecutive loss spikes up to step {step} (last: {event['reason']}): the loss or "
                "gradient norm has left its statistics for good (a changed data mix or learning rate, or a diverged "
                "run), and every step would now be a spike. Look at the run; raise `max_consecutive` or `threshold`, "
                "or resume without the callback's state to restart its statistics.",
                batch_idx,
            )
        if taken == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return True
        if taken == "lr_backoff":
            self.backoff_remaining = self.backoff_steps
        return False

    def _log_event(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        step = event["step"]
        metrics = {f"{TAG}/count": self.count, f"{TAG}/z": event["z"]}
        for key in ("loss", "grad_norm"):
            if event[key] is not None:
                metrics[f"{TAG}/{key}"] = event[key]
        log_scalars(trainer, metrics, step)
        line = (
            f"step {step} (epoch {event['epoch']}, batches {event['batch_indices']}): **{event['action']}**: "
            f"{event['reason']}; loss {_fmt(event['loss'])}, grad norm {_fmt(event['grad_norm'])}, z {_fmt(event['z'])}"
        )
        log_text(trainer, f"{TAG}/events", line, step)

    def _write_exclude_batches(self, trainer: pl.Trainer, batch_indices: list[int]) -> Path:
        path = Path(self.exclude_batches_path or trainer.default_root_dir)
        if path.suffix != ".json":
            path = path / "skip_batches.json"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            previous = json.loads(path.read_text()) if path.is_file() else []
            path.write_text(json.dumps(previous + [i for i in batch_indices if i not in previous], indent=4))
        return path

    # ---- learning-rate backoff -----------------------------------------------------------------

    def _scale_lr(self, optimizer: Optimizer) -> None:
        if self._hook is None:
            # Registered at the first backoff, after the optimizer hooks other callbacks register in
            # on_train_start: hooks run in registration order, so theirs still see the reduced lr.
            self._hook = optimizer.register_step_post_hook(lambda *_: self._restore_lr())
        for group in optimizer.param_groups:
            self._restore.append((group, group["lr"]))
            group["lr"] = group["lr"] * self.backoff_factor
        self.backoff_remaining -= 1

    def _restore_lr(self) -> None:
        for group, lr in self._restore:
            group["lr"] = lr
        self._restore = []

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _reset_step(self) -> None:
        self._loss_sum, self._loss_count, self._batch_indices = None, 0, []

    # ---- layout and state ----------------------------------------------------------------------

    def charts(self, trainer: pl.Trainer) -> Layout:
        return {
            f"{PREFIX}: loss spikes": {
                "spikes so far": ["Multiline", [rf"^{TAG}/count$"]],
                f"z-score against the running statistics (a spike above {self.detector.threshold:g})": [
                    "Multiline", [rf"^{TAG}/zscore$"]
                ],
                "z-score of each spike": ["Multiline", [rf"^{TAG}/z$"]],
                "loss at spikes": ["Multiline", [rf"^{TAG}/loss$"]],
                "gradient norm at spikes": ["Multiline", [rf"^{TAG}/grad_norm$"]],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "count": self.count,
            "consecutive": self.consecutive,
            "backoff_remaining": self.backoff_remaining,
            "events": list(self.events),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.count = int(state_dict["count"])
        self.consecutive = int(state_dict["consecutive"])
        self.backoff_remaining = int(state_dict["backoff_remaining"])
        self.events = list(state_dict["events"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
