"""What the ``lowmem`` callbacks cost per training step on the example model, at their default intervals.

The model, data, optimizer (AdamMini) and trainer settings are those of ``examples/configs/gpt_tiny.yaml``
(``examples/train_gpt.py``'s ``LitGPT``); only ``max_steps`` and the logging location change. Runs,
``rounds`` times interleaved:

* a baseline run without callbacks;
* a run with the four callbacks at their defaults: ``OptimizerStateMonitor()``,
  ``TrajectoryDistance("compare")``, ``LossSpikeMonitor()``, ``OptimizerDiagnostics()``. The
  snapshots ``compare`` reads are written beforehand from the initial weights (the distances are
  meaningless, the cost of loading and comparing is the real one; an AdamW run to record them would
  double the benchmark's time);

then once ``TrajectoryDistance("record")`` and ``TrajectoryDistance("shadow")``, the other modes.

Two measures of the overhead, as a percentage of the baseline step time:

* *attributed*: the time spent inside each callback's hooks (and the optimizer hooks it registers),
  timed directly and averaged over all steps of the run, so that a measurement every 100 steps counts
  1/100 of its cost. This is the headline number.
* *end to end*: the mean step time of the run with callbacks against the baseline's (the fastest
  of ``rounds`` runs each), which includes everything (the TensorBoard writer's thread too).

On CPU, time is the process's CPU time (``time.process_time``) with one intra-op thread
(``--threads``): on a shared machine wall-clock steps vary several-fold with the other load, CPU
time measures the work. On a GPU it is wall-clock time with ``torch.cuda.synchronize()`` around
every timed hook.

The runs are short (250 steps by default), so one-off costs (the first TensorBoard text, the
snapshot at step 0) weigh more than in a long run: the figures are upper bounds.

    python benchmarks/callback_overhead.py                 # ~2 minutes on an idle 2-core CPU
    python benchmarks/callback_overhead.py --steps 500 --rounds 3
    python benchmarks/callback_overhead.py --accelerator gpu
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from train_gpt import DEFAULT_CONFIG, LitGPT  # noqa: E402

from lightning_lowmem.callbacks import (  # noqa: E402
    LossSpikeMonitor,
    OptimizerDiagnostics,
    OptimizerStateMonitor,
    TrajectoryDistance,
)
from lightning_lowmem.callbacks.core.distance import save_snapshot, snapshot_path  # noqa: E402
from lightning_lowmem.data import CharTextDataModule  # noqa: E402

HOOKS = (
    "setup", "on_train_start", "on_train_batch_start", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_train_batch_end", "on_train_end", "teardown",
)


def clock(cuda: bool) -> Callable[[], float]:
    """Wall-clock time on a GPU, the process's CPU time on CPU."""
    return time.perf_counter if cuda else time.process_time


class Attribution:
    """Times every hook of the given callbacks, and every optimizer post-step hook they register."""

    def __init__(self, cuda: bool) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = cuda
        self.clock = clock(cuda)
        self._current: list[str] = []
        self._register = torch.optim.Optimizer.register_step_post_hook

    def timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                torch.cuda.synchronize()
            start = self.clock()
            self._current.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self._current.pop()
                if self.cuda:
                    torch.cuda.synchronize()
                if not self._current:  # nested calls count once
                    self.seconds[label] += self.clock() - start

        return wrapper

    def instrument(self, label: str, callback: Callback) -> Callback:
        for hook in HOOKS:
            if getattr(type(callback), hook) is not getattr(Callback, hook):
                setattr(callback, hook, self.timed(label, getattr(callback, hook)))
        return callback

    def __enter__(self) -> Attribution:
        attribution, register = self, self._register

        def register_timed(optimizer: torch.optim.Optimizer, hook: Callable[..., Any]) -> Any:
            label = attribution._current[-1] if attribution._current else None
            return register(optimizer, attribution.timed(label, hook) if label else hook)

        torch.optim.Optimizer.register_step_post_hook = register_timed
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.optim.Optimizer.register_step_post_hook = self._register


class StepTimer(Callback):
    """Time between consecutive optimizer steps (data loading, forward, backward, step, callbacks)."""

    def __init__(self, cuda: bool) -> None:
        self.times: list[float] = []
        self._last: float | None = None
        self.clock, self.cuda = clock(cuda), cuda

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = self.clock()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def build(cfg: Any) -> tuple[CharTextDataModule, LitGPT]:
    L.seed_everything(cfg.seed, verbose=False)
    data = CharTextDataModule(**cfg.data)
    model = LitGPT(model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True))
    return data, model


def run(cfg: Any, root: Path, name: str, callbacks: list[tuple[str, Callback]], cuda: bool) -> tuple[float, dict[str, float]]:
    """Fit the example for ``cfg.trainer.max_steps`` steps: the mean step time and the seconds in each callback."""
    data, model = build(cfg)
    timer = StepTimer(cuda)
    with Attribution(cuda) as attribution:
        trainer = L.Trainer(
            logger=TensorBoardLogger(str(root), name=name),
            callbacks=[timer] + [attribution.instrument(label, cb) for label, cb in callbacks],
            **{"enable_model_summary": False, **OmegaConf.to_container(cfg.trainer, resolve=True),
               "enable_checkpointing": False, "enable_progress_bar": False, "limit_val_batches": 0},
        )
        trainer.fit(model, datamodule=data)
    return statistics.fmean(timer.times), dict(attribution.seconds)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="baseline / four-callback run pairs")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_lowmem"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = OmegaConf.load(DEFAULT_CONFIG)
    cfg.trainer.max_steps = args.steps
    cfg.trainer.accelerator = args.accelerator
    cuda = args.accelerator in ("gpu", "cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    every = inspect.signature(TrajectoryDistance).parameters["every_n_steps"].default

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        snapshots = root / "snapshots"
        _, model = build(cfg)
        weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for step in sorted({*range(0, args.steps + 1, every), args.steps}):  # the last step is measured too
            save_snapshot(weights, snapshot_path(snapshots, step))

        baselines, withs, seconds = [], [], defaultdict(list)
        for _ in range(args.rounds):
            base_time, _ = run(cfg, root, "baseline", [], cuda)
            baselines.append(base_time)
            four = [
                ("OptimizerStateMonitor()", OptimizerStateMonitor()),
                ("TrajectoryDistance(compare)", TrajectoryDistance("compare", snapshots)),
                ("LossSpikeMonitor()", LossSpikeMonitor()),
                ("OptimizerDiagnostics()", OptimizerDiagnostics()),
            ]
            step_time, spent = run(cfg, root, "four", four, cuda)
            withs.append(step_time)
            for label, _ in four:
                seconds[label].append(spent.get(label, 0.0))
        others = [
            ("TrajectoryDistance(record)", TrajectoryDistance("record", root / "recorded")),
            ("TrajectoryDistance(shadow)", TrajectoryDistance("shadow")),
        ]
        _, extra = run(cfg, root, "other_modes", others, cuda)

    base, steps = min(baselines), args.steps
    rows = [(label, min(values) / steps) for label, values in seconds.items()]
    total = sum(per_step for _, per_step in rows)
    what = "wall-clock" if cuda else f"CPU time, {args.threads} thread(s)"
    print(f"\nCallback overhead on examples/configs/gpt_tiny.yaml ({steps} steps, {args.accelerator}, {what}; "
          f"baseline {1e3 * base:.1f} ms/step; time inside each callback, best of {args.rounds} run(s))\n")
    header = f"{'callback (default interval)':<30} {'ms/step':>9} {'% of step':>10}"
    print(header)
    print("-" * len(header))
    for label, per_step in rows:
        print(f"{label:<30} {1e3 * per_step:>9.3f} {100 * per_step / base:>9.2f}%")
    print("-" * len(header))
    print(f"{'the four together':<30} {1e3 * total:>9.3f} {100 * total / base:>9.2f}%")
    print("-" * len(header))
    for label, _ in others:
        per_step = extra.get(label, 0.0) / steps
        print(f"{label:<30} {1e3 * per_step:>9.3f} {100 * per_step / base:>9.2f}%")
    end_to_end = min(withs) / base - 1
    print(f"\nend to end: {1e3 * base:.1f} ms/step without callbacks, {1e3 * min(withs):.1f} ms/step with the four "
          f"({100 * end_to_end:+.1f}%; mean step times of the runs: {', '.join(f'{1e3 * b:.1f}' for b in baselines)} vs "
          f"{', '.join(f'{1e3 * w:.1f}' for w in withs)} ms)")


if __name__ == "__main__":
    main(sys.argv[1:])
