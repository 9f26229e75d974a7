"""Runs for ``test_checkpoint_faults.py``: saves killed at chosen stages, then resumed and refused loads.

``python _fault_worker.py MODE OUT [FMT STAGE]`` in each of 2 processes (launched like
``_dist_worker.py``):

* ``base``: an uninterrupted 3-epoch run (``reference.pt``), and per format (``dcp``, ``full``)
  ``OUT/<fmt>/ckpt`` after epoch 1 (``last.ckpt``, ``epoch=0.ckpt``), plus one-epoch checkpoints of
  AdamMini and MicroAdam for the mismatch cases.
* ``kill``: resumes ``OUT/ckpt`` (a copy of a base folder) with ``ckpt_path="last"`` and trains
  epoch 2; when the save of ``last.ckpt`` reaches STAGE, writes ``OUT/paused-<rank>`` and sleeps
  until the test kills it with SIGKILL.
* ``check``: for every folder ``OUT/scenarios/*/ckpt``, ``fit(ckpt_path="last")`` to the end of epoch 3
  (the restored step and the final weights recorded), then the loads that must be refused, and the
  non-finite loss runs; facts to ``OUT/check.json``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from _dist_worker import EPOCH_STEPS, GLOBAL_BATCH, PG_TIMEOUT, Net, Results, loader, trainer  # noqa: E402
from lightning_lowmem.callbacks import LossSpikeMonitor
from lightning_lowmem.strategies import LowMemFSDPStrategy, load_weights
from lightning_lowmem.strategies.atomic import STAGE_HOOKS

WORLD = 2
N = EPOCH_STEPS * GLOBAL_BATCH


class WideNet(Net):
    """The same model with a 24-row head: its checkpoint does not fit ``Net``."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__(optimizer)
        self.head = nn.Linear(8, 24)


class NaNAtStep(Net):
    """A loss that is NaN at the given global step, on rank 1 only (the other rank's loss is finite)."""

    def __init__(self, bad_step: int) -> None:
        super().__init__("adamw")
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.bad_step and self.global_rank == 1:
            loss = loss * float("nan")
        return loss


class RestoredStep(Callback):
    """The global step of the checkpoint a fit resumed from."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.step = checkpoint["global_step"]


def strategy(fmt: str, **kwargs: Any) -> LowMemFSDPStrategy:
    return LowMemFSDPStrategy(save_distributed_checkpoint=(fmt == "dcp"), timeout=PG_TIMEOUT, **kwargs)


def saver(directory: Path) -> ModelCheckpoint:
    # enable_version_counter=False: a copied folder (another dirpath) overwrites last.ckpt, not last-v1.ckpt
    return ModelCheckpoint(dirpath=directory, filename="{epoch}", save_last=True, save_top_k=-1, every_n_epochs=1,
                           enable_version_counter=False)


def run_base(out: Path, rank: int) -> None:
    res = Results(out, "base", rank)
    model = Net("adamw")
    trainer(WORLD, max_epochs=3).fit(model, loader(N, WORLD, rank))
    res.weights("reference", model)
    for fmt in ("dcp", "full"):
        trainer(WORLD, strategy=strategy(fmt), max_epochs=1, callbacks=[saver(out / fmt / "ckpt")]).fit(
            Net("adamw"), loader(N, WORLD, rank)
        )
        for opt in ("adam_mini", "micro_adam"):
            t = trainer(WORLD, strategy=strategy(fmt), max_steps=1)
            t.fit(Net(opt), loader(GLOBAL_BATCH, WORLD, rank))
            t.save_checkpoint(out / fmt / f"{opt}.ckpt")
    res.save()


def run_kill(out: Path, rank: int, fmt: str, stage: str) -> None:
    def pause(reached: str, path: Path) -> None:
        if reached == stage and path.name == "last.ckpt":
            (out / f"paused-{rank}").write_text(reached)
            time.sleep(600)  # killed here by the test

    STAGE_HOOKS.append(pause)
    directory = out / "ckpt"
    trainer(WORLD, strategy=strategy(fmt), max_epochs=2, callbacks=[saver(directory)]).fit(
        Net("adamw", seed=7), loader(N, WORLD, rank), ckpt_path=directory / "last.ckpt"
    )
    raise RuntimeError(f"the save of last.ckpt never reached the stage {stage!r}")


def run_check(out: Path, rank: int) -> None:
    res = Results(out, "check", rank)
    for scenario in sorted((out / "scenarios").iterdir()):
        fmt = scenario.name.split("-")[0]
        model, restored = Net("adamw", seed=7), RestoredStep()
        t = trainer(WORLD, strategy=strategy(fmt), max_epochs=3, callbacks=[saver(scenario / "ckpt"), restored])
        t.fit(model, loader(N, WORLD, rank), ckpt_path="last")
        res.weights(f"resumed-{scenario.name}", model)
        res.fact(f"restored-{scenario.name}", restored.step)

    def resume(fmt: str, path: Path, model: Net | None = None) -> None:
        t = trainer(WORLD, strategy=strategy(fmt), max_epochs=2)
        t.fit(model or Net("adamw"), loader(N, WORLD, rank), ckpt_path=path)

    for name in sorted(os.listdir(out / "refused")):  # damaged and incomplete checkpoints the test prepared
        fmt = name.split("-")[0]
        res.error(f"refused-{name}", lambda: resume(fmt, out / "refused" / name))

    for fmt in ("dcp", "full"):  # mismatches: (checkpoint, model of the run)
        base = out / fmt
        for case, path, model_fn in (
            ("adamw_to_adam_mini", base / "ckpt" / "epoch=0.ckpt", lambda: Net("adam_mini")),
            ("adam_mini_to_micro_adam", base / "adam_mini.ckpt", lambda: Net("micro_adam")),
            ("micro_adam_to_adam_mini", base / "micro_adam.ckpt", lambda: Net("adam_mini")),
            ("width", base / "ckpt" / "epoch=0.ckpt", lambda: WideNet("adamw")),
        ):
            res.error(f"mismatch-{fmt}-{case}", lambda: resume(fmt, path, model_fn()))

    # the way out the messages give: the weights only, into a model with another optimizer
    for fmt in ("dcp", "full"):
        model = Net("adam_mini", seed=7)
        load_weights(model, out / fmt / "ckpt" / "epoch=0.ckpt")
        if rank == 0:
            torch.save(model.state_dict(), out / f"loaded-{fmt}.pt")
        trainer(WORLD, strategy=strategy(fmt), max_steps=1).fit(model, loader(GLOBAL_BATCH, WORLD, rank))
        res.fact(f"loaded-{fmt}-losses", model.losses)

    # a NaN loss on one rank at step 2, without any callback; "raise" is the default
    for action in ("raise", "skip"):
        model = NaNAtStep(bad_step=2)
        options = {} if action == "raise" else {"nonfinite_loss": action}
        res.error(
            f"nan-{action}",
            lambda: trainer(WORLD, strategy=strategy("dcp", **options), max_steps=4).fit(
                model, loader(4 * GLOBAL_BATCH, WORLD, rank)
            ),
        )
        res.fact(f"nan-{action}-finite", all(torch.isfinite(p.full_tensor()).all().item() for p in model.parameters()))
        res.fact(f"nan-{action}-step", model.trainer.global_step)
    # LossSpikeMonitor skips non-finite steps itself: the strategy's default leaves the step to it
    model = NaNAtStep(bad_step=2)
    monitor = LossSpikeMonitor(action="log")  # within its warmup only a non-finite step is a spike
    res.error("nan-monitor", lambda: trainer(WORLD, strategy=strategy("dcp"), max_steps=4, callbacks=[monitor],
                                                 logger=CSVLogger(out / "nan-monitor-logs")).fit(
        model, loader(4 * GLOBAL_BATCH, WORLD, rank)))
    res.fact("nan-monitor-finite", all(torch.isfinite(p.full_tensor()).all().item() for p in model.parameters()))
    res.fact("nan-monitor-events", [(e["step"], e["action"]) for e in monitor.events])
    model = NaNAtStep(bad_step=2)
    trainer(WORLD, strategy=strategy("dcp", nonfinite_loss="ignore"), max_steps=4).fit(model, loader(4 * GLOBAL_BATCH, WORLD, rank))
    res.fact("nan-ignore-finite", all(torch.isfinite(p.full_tensor()).all().item() for p in model.parameters()))
    res.save()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        if mode == "base":
            run_base(out, rank)
        elif mode == "kill":
            run_kill(out, rank, sys.argv[3], sys.argv[4])
        else:
            run_check(out, rank)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
