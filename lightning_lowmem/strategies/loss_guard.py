"""Keep a non-finite loss away from the weights: one decision, taken the same way on every rank.

A NaN or infinite loss gives NaN gradients; one optimizer step then turns every weight and every
optimizer state NaN, and the run goes on (exit code 0) training nothing. Under data parallelism a
single rank's bad batch is enough: the gradient reduction spreads its NaN to all ranks.

:class:`LossGuard` records, without synchronising, whether any micro-batch since the last optimizer
step had a non-finite loss; before the step, the ranks agree on it (one all-reduce of one flag) and
then, on every rank alike:

* ``"raise"`` (the default of ``LowMemFSDPStrategy``): raise :class:`NonFiniteLossError`. The
  weights and optimizer state are still those of the last finite step, the job ends with an error
  that names the step, and the last checkpoint is a sound place to resume from (with a lower
  learning rate, or after fixing the data). A diverging run should stop, not continue on NaN.
* ``"skip"``: drop the gradients (the optimizers skip a parameter without a gradient), warn, and go
  on. For runs that expect an occasional bad batch.
* ``"ignore"``: no check, no synchronisation (the behaviour of Lightning's strategies).

Example::

    >>> guard = LossGuard("raise")
    >>> guard.record(loss)                  # after each training_step
    >>> guard.check(params, step, any_rank)  # before each optimizer step
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

#: What ``LowMemFSDPStrategy(nonfinite_loss=...)`` accepts.
NONFINITE_LOSS_ACTIONS = ("raise", "skip", "ignore")


class NonFiniteLossError(FloatingPointError):
    """A training step had a NaN or infinite loss; the optimizer step was not taken."""


class LossGuard:
    """Records non-finite losses between optimizer steps and acts on them before the step.

    Args:
        action: ``"raise"``, ``"skip"`` or ``"ignore"`` (see the module's documentation).

    Raises:
        ValueError: for another ``action``.
    """

    def __init__(self, action: str) -> None:
        if action not in NONFINITE_LOSS_ACTIONS:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_LOSS_ACTIONS}, got {action!r}.")
        self.action = action
        self._nonfinite: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return self.action != "ignore"

    def record(self, step_output: Any) -> None:
        """Note whether the loss of a ``training_step`` output (a tensor or a dict with ``"loss"``) is finite."""
        loss = step_output.get("loss") if isinstance(step_output, dict) else step_output
        if not self.enabled or not isinstance(loss, torch.Tensor):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    def check(self, params: Iterable[torch.Tensor], step: int, any_rank: Callable[[bool], bool]) -> None:
        """Before an optimizer step: agree across ranks (``any_rank``, a collective) and act.

        Raises:
            NonFiniteLossError: with ``"raise"``, if some rank had a non-finite loss since the last step.
        """
        if not self.enabled:
            return
        local = bool(self._nonfinite.item()) if self._nonfinite is not None else False
        self._nonfinite = None
        if not any_rank(local):
            return
        if self.action == "raise":
            raise NonFiniteLossError(
                f"The loss is NaN or infinite at step {step} (on {'this' if local else 'another'} rank); the "
                "optimizer step was not taken, so the weights are those of the last finite step. Resume from "
                "the last checkpoint with a lower learning rate or after checking the data, or pass "
                "LowMemFSDPStrategy(nonfinite_loss='skip') to skip such steps with a warning."
            )
        for p in params:
            p.grad = None
        rank_zero_warn(f"Skipped the optimizer step at step {step}: the loss is NaN or infinite on some rank.")
