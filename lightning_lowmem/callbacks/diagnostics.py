"""``OptimizerDiagnostics``: effective learning rates, update/weight ratios and the gradient norm."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.optim import Optimizer

from lightning_lowmem.callbacks._logging import (
    PREFIX,
    Layout,
    LowMemCallback,
    check_positive_int,
    log_histogram,
    log_scalars,
    log_series,
)
from lightning_lowmem.callbacks.core.diagnostics import (
    layer_group,
    quantile_names,
    quantiles_of,
    relative_lr_samples,
    update_ratios,
    weights_by_group,
)
from lightning_lowmem.callbacks.core.kinds import kinds_present, parameter_names, state_segments
from lightning_lowmem.strategies.sharding import total_grad_norm

if TYPE_CHECKING:
    import lightning.pytorch as pl

TAG = f"{PREFIX}/diagnostics"


class _Pending(NamedTuple):
    """What a diagnosed step measured before the update, for the optimizer's post-step hook."""

    trainer: Any
    optimizer: Optimizer
    step: int
    grad_norm: float
    named: dict[str, torch.Tensor]
    before: dict[str, list[torch.Tensor | None]]
    mesh: object | None


class OptimizerDiagnostics(LowMemCallback):
    r"""Logs what the optimizer does to the weights, for low-memory optimizers and AdamW alike.

    For the updates with index ``step = trainer.global_step`` (the step Lightning logs that
    batch's loss at) ``every_n_steps``, ``2 * every_n_steps``, ... and the last update of the fit
    (the first update, index 0, is left out: its lr is usually 0 under warmup and its second moment
    is one gradient, which says little about the run):

    * ``lowmem/diagnostics/grad_norm``: the global gradient norm before the update (and before
      gradient clipping), reduced across ranks for FSDP2 ``DTensor`` gradients;
    * ``lowmem/diagnostics/log10_relative_lr/<kind>/p<q>``: quantiles, and a histogram
      ``lowmem/diagnostics/log10_relative_lr/<kind>``, of :math:`\log_{10}` of the effective
      per-block learning rate divided by the configured one, :math:`1 / (\sqrt{\hat v_b} +
      \epsilon)`, after the update, per block kind (segments of a fused parameter by their own
      kind; every element of AdamW is a ``full`` block), so an AdamW run and an AdamMini run can be
      laid side by side: 3 means the block steps 1000 times its lr times its momentum (see
      :mod:`lightning_lowmem.callbacks.core.diagnostics`; parameters without ``exp_avg_sq``, like
      MicroAdam's compressed ones, have none);
    * ``lowmem/diagnostics/update_ratio``: :math:`\lVert\Delta w\rVert / \lVert w\rVert` of the
      update, one series per layer group (``transformer.h.3``, ``transformer.wte``, ...; see
      :func:`~lightning_lowmem.callbacks.core.diagnostics.layer_group`). This needs a copy of the
      (local shards of the) weights during a diagnosed step.

    Every ``lowmem`` callback's charts are grouped in one TensorBoard custom-scalars layout (the
    "Custom Scalars" tab), written once by the first of them to start. The hooks run collectives
    under FSDP: every rank must run this callback.

    Args:
        every_n_steps: optimizer steps between diagnosed steps.
        quantiles: quantiles of the effective learning rates, in ``[0, 1]``.
        histograms: also write histograms of the effective learning rates.
        max_samples: blocks sampled per kind and rank for quantiles and histograms.
        group_fn: maps a parameter name to its layer group.

    Raises:
        ValueError: for an ``every_n_steps`` or ``max_samples`` that is not an int >= 1, or
            quantiles outside ``[0, 1]``.
        MisconfigurationException: if the ``Trainer`` has no logger.

    Example::

        >>> from lightning_lowmem.callbacks import OptimizerDiagnostics
        >>> trainer = Trainer(callbacks=[OptimizerDiagnostics(every_n_steps=100)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        quantiles: Sequence[float] = (0.01, 0.5, 0.99),
        histograms: bool = True,
        max_samples: int = 4096,
        group_fn: Callable[[str], str] = layer_group,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("max_samples", max_samples)
        quantiles = tuple(quantiles)
        if not quantiles or not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantiles must be a non-empty sequence of numbers in [0, 1], got {quantiles!r}.")
        self.every_n_steps = every_n_steps
        self.quantiles = quantiles
        self.histograms = histograms
        self.max_samples = max_samples
        self.group_fn = group_fn
        self._names: dict[torch.Tensor, str] = {}
        self._hooks: list[Any] = []
        self._pending: _Pending | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._names = parameter_names(pl_module, trainer.optimizers)
        self._remove_hooks()
        self._hooks = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        step = trainer.global_step
        last = step + 1 >= trainer.estimated_stepping_batches
        if step == 0 or (step % self.every_n_steps and not last):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(total_grad_norm(params))
        named = {self._names[p]: p for p in params}
        before, mesh = weights_by_group(named, self.group_fn)
        self._pending = _Pending(trainer, optimizer, step, grad_norm, named, before, mesh)

    @torch.no_grad()
    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if pending is None or pending.optimizer is not optimizer:
            return
        self._pending = None
        trainer, step = pending.trainer, pending.step
        metrics = {f"{TAG}/grad_norm": pending.grad_norm}
        ratios = update_ratios(pending.before, pending.named, self.group_fn, pending.mesh)
        samples = relative_lr_samples([optimizer], self.max_samples, seed=step)
        names = quantile_names(self.quantiles)
        for kind, values in samples.items():
            if values.numel() == 0:
                continue
            values = values.log10()
            for name, value in zip(names, quantiles_of(values, self.quantiles)):
                metrics[f"{TAG}/log10_relative_lr/{kind}/{name}"] = value
            if self.histograms:
                log_histogram(trainer, f"{TAG}/log10_relative_lr/{kind}", values, step)
        log_scalars(trainer, metrics, step)
        log_series(trainer, f"{TAG}/update_ratio", ratios, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._pending = None

    # ---- layout --------------------------------------------------------------------------------

    def charts(self, trainer: pl.Trainer) -> Layout:
        kinds = [seg.kind for optimizer in trainer.optimizers for segs in state_segments(optimizer).values() for seg in segs]
        names = quantile_names(self.quantiles)
        charts: dict[str, list[Any]] = {
            "gradient norm (before clipping)": ["Multiline", [rf"^{TAG}/grad_norm$"]],
            "update / weight norm by layer group": ["Multiline", [rf"^{TAG}/update_ratio$"]],
        }
        for kind in kinds_present(kinds):
            tags = [f"{TAG}/log10_relative_lr/{kind}/{n}" for n in names]
            title = f"log10(effective lr / lr): {kind} blocks"
            if 0.5 in self.quantiles and len(self.quantiles) >= 3:  # median with the outermost quantiles as margins
                lo, hi = names[self.quantiles.index(min(self.quantiles))], names[self.quantiles.index(max(self.quantiles))]
                median = names[self.quantiles.index(0.5)]
                charts[f"{title} (median, {lo}-{hi})"] = ["Margin", [f"{TAG}/log10_relative_lr/{kind}/{n}" for n in (median, lo, hi)]]
            else:
                charts[title] = ["Multiline", [f"^{t}$" for t in tags]]
        return {f"{PREFIX}: optimizer diagnostics": charts}
