"""What the ``lowmem`` callbacks share: the logger check, where values go, and the custom-scalars layout.

Scalars go to every logger of the ``Trainer`` (``logger.log_metrics``, which writes on rank zero);
text, histograms and the custom-scalars layout go to the first ``TensorBoardLogger``. Every tag
starts with :data:`PREFIX`. None of these helpers runs a collective, and none is ``rank_zero_only``:
the callbacks' hooks run on every rank because their measurements do run collectives.

A quantity with several series (state MB by block kind, the update ratio by layer group) is one
tag written to one TensorBoard run per series (``SummaryWriter.add_scalars``: the run
``version_0/lowmem_state_mb_by_kind_row`` holds the ``row`` series of ``lowmem/state/mb_by_kind``),
because TensorBoard colours lines by run: so they are one chart whose lines a reader tells apart.
Other loggers get the series as ``<tag>/<series>``.

The custom-scalars layout lists only the charts that have data: it is written again, with the new
charts, when a callback logs a tag for the first time (TensorBoard shows the latest layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import re
import weakref

import torch
from lightning.fabric.loggers import TensorBoardLogger
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Every tag the callbacks write starts with this.
PREFIX = "lowmem"

#: A custom-scalars layout: ``category -> {chart title: [chart type, [tag regexes or tags]]}``.
Layout = dict[str, dict[str, list[Any]]]


class LowMemCallback(Callback):
    """Base of the ``lowmem`` callbacks: refuses to fit with a ``Trainer`` without a logger.

    Subclasses describe their TensorBoard charts in :meth:`charts`; one custom-scalars layout holds
    the charts of all of them that have data.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:  # they measure and log during training only
            raise MisconfigurationException(
                f"Cannot use `{type(self).__name__}` callback with `Trainer` that has no logger. "
                "Pass Trainer(logger=TensorBoardLogger(...)) (or leave the default logger on)."
            )

    def charts(self, trainer: pl.Trainer) -> Layout:
        """This callback's part of the custom-scalars layout."""
        return {}


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first ``TensorBoardLogger`` (a no-op stand-in off rank zero)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger at ``step``."""
    metrics = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    _logged(trainer, metrics)


def log_series(trainer: pl.Trainer, tag: str, values: Mapping[str, float], step: int) -> None:
    """Log the series ``values`` (``series -> value``) of quantity ``tag`` at ``step``: one run per series in TensorBoard."""
    if not values:
        return
    values = {k: float(v) for k, v in values.items()}
    writer = tensorboard_writer(trainer)
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_metrics({f"{tag}/{k}": v for k, v in values.items()}, step=step)
    if writer is not None and trainer.is_global_zero:
        writer.add_scalars(tag, values, global_step=step)
    _logged(trainer, {tag: 0.0})


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """Write ``text`` (markdown) as a TensorBoard text summary."""
    writer = _writer_or_warn(trainer, "text")
    if writer is not None:
        writer.add_text(tag, text, global_step=step)


def log_histogram(trainer: pl.Trainer, tag: str, values: torch.Tensor, step: int) -> None:
    """Write a TensorBoard histogram of ``values`` (nothing for an empty tensor)."""
    if values.numel() == 0 or not trainer.is_global_zero:
        return
    writer = _writer_or_warn(trainer, "histograms")
    if writer is not None:
        writer.add_histogram(tag, values.detach().to(torch.float64).cpu(), global_step=step)


# writer -> (tags logged so far, the layout last written)
_written: weakref.WeakKeyDictionary[Any, tuple[set[str], Layout | None]] = weakref.WeakKeyDictionary()


def _logged(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero:
        return
    tags, _ = _written.setdefault(writer, (set(), None))
    if not tags.issuperset(metrics):
        tags.update(metrics)
        write_layout(trainer)


def write_layout(trainer: pl.Trainer) -> None:
    """Write the custom-scalars layout of the ``lowmem`` callbacks of ``trainer``: the charts that have data.

    A chart has data when one of its tag patterns matches a tag logged through :func:`log_scalars`
    or :func:`log_series`. Nothing is written when the layout has not changed.
    """
    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero:
        return
    tags, last = _written.setdefault(writer, (set(), None))
    layout: Layout = {}
    for callback in trainer.callbacks:
        if isinstance(callback, LowMemCallback):
            for category, charts in callback.charts(trainer).items():
                for title, (kind, patterns) in charts.items():
                    if any(re.search(p, t) for p in patterns for t in tags):
                        layout.setdefault(category, {})[title] = [kind, patterns]
    if layout and layout != last:
        writer.add_custom_scalars(layout)
        _written[writer] = (tags, layout)


_warned: set[tuple[int, str]] = set()


def _writer_or_warn(trainer: pl.Trainer, what: str) -> Any | None:
    writer = tensorboard_writer(trainer)
    if writer is None and (id(trainer), what) not in _warned:
        _warned.add((id(trainer), what))
        names = ", ".join(type(logger).__name__ for logger in trainer.loggers)
        rank_zero_warn(f"The lowmem callbacks write {what} to TensorBoard only; this Trainer's loggers are {names}.")
    return writer


def check_positive_int(name: str, value: object) -> None:
    """Raise a ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
