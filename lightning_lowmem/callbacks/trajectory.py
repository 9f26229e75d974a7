"""``TrajectoryDistance``: how far the weights are from where AdamW would have taken them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_lowmem.callbacks.core.distance import (
    Distance,
    ShadowAdamW,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_path,
    weight_distance,
)
from lightning_lowmem.callbacks.core.kinds import param_kinds, parameter_names
from lightning_lowmem.callbacks._logging import PREFIX, Layout, LowMemCallback, check_positive_int, log_scalars, log_series
from lightning_lowmem.optim.hparams import check_choice

if TYPE_CHECKING:
    import lightning.pytorch as pl

TAG = f"{PREFIX}/trajectory"
MODES = ("record", "compare", "shadow")


class TrajectoryDistance(LowMemCallback):
    r"""Distance of the weights to AdamW's trajectory (Adam-mini paper, appendix A.5).

    Run the low-memory optimizer and AdamW from the same initial weights and data order
    (``seed_everything``, the same data module) and measure, every ``every_n_steps`` optimizer
    steps and after the last one, the L2 and relative L2 distance :math:`\lVert w - w^{\mathrm{AdamW}}\rVert_2 /
    \lVert w^{\mathrm{AdamW}}\rVert_2` over all trainable parameters and per block kind.

    * ``mode="record"``, in the AdamW run: save the weights after 0, N, 2N, ... steps and the last under
      ``dirpath/step_<8 digits>/`` with ``torch.distributed.checkpoint`` (under FSDP each rank
      writes its shards; a recording loads on any number of ranks).
    * ``mode="compare"``, in the low-memory run: load the snapshot of the same step into fresh
      tensors and log the distance. A missing snapshot, or one with other parameter names or
      shapes, raises an error that names what differs. A nonzero distance at step 0 warns that the
      initial weights differ.
    * ``mode="shadow"``, for models that fit twice and no reference run: keep an AdamW copy of the
      trainable weights and its state, stepped after every live step with the live (clipped)
      gradients and the live param groups' ``lr``/``betas``/``eps``/``weight_decay`` (so a
      schedule applies to both; a step the live optimizer skips, e.g. by
      :class:`~lightning_lowmem.callbacks.LossSpikeMonitor`, is skipped by the copy too), and log the
      distance to it. Fed the *live* gradients, the copy answers "where would AdamW's update rule
      have taken these weights", which matches the ``compare`` distance while the two trajectories
      are close (it is exactly 0 for an AdamW run) and can drift from it later, as gradients taken
      at different weights differ. The copy and its state are saved in checkpoints.

    Distances are logged at ``step = trainer.global_step`` (optimizer steps taken) as
    ``lowmem/trajectory/<mode>/rel_l2``, ``.../l2`` and ``.../rel_l2_by_kind`` (one series per kind:
    the parameter's block kind in the optimizer's plan, its segments' kinds joined by ``+`` for a
    fused projection such as GPT-2's ``c_attn``, ``head+row``; ``full`` for AdamW; see
    :mod:`lightning_lowmem.callbacks.core.kinds`). In ``compare`` mode the last step is measured
    when the recording has it (it has when it ran as many steps). The hooks run collectives under FSDP (checkpoint I/O, one all-reduce per distance):
    every rank must run this callback.

    Args:
        mode: ``"record"``, ``"compare"`` or ``"shadow"``.
        dirpath: the snapshots' directory (``record`` and ``compare``).
        every_n_steps: optimizer steps between snapshots or distances (the paper uses 250 in runs of
            thousands of steps; 50 draws a curve in a run of a few hundred).
        shadow_hparams: AdamW hyperparameters of the shadow that replace the live optimizer's
            (``shadow`` only), e.g. ``{"betas": (0.9, 0.95)}`` when the live optimizer has none.

    Raises:
        ValueError: for an unknown ``mode``, a missing or superfluous ``dirpath``, or an
            ``every_n_steps`` that is not an int >= 1.
        MisconfigurationException: if the ``Trainer`` has no logger.
        FileNotFoundError: in ``compare`` mode, if ``dirpath`` holds no snapshots, or not the one a
            step needs (the message lists those it holds).
        RuntimeError: in ``shadow`` mode, if the model has more than one optimizer.

    Example::

        >>> from lightning_lowmem.callbacks import TrajectoryDistance
        >>> seed_everything(0); Trainer(callbacks=[TrajectoryDistance("record", "runs/adamw_traj")]).fit(adamw_model, data)
        >>> seed_everything(0); Trainer(callbacks=[TrajectoryDistance("compare", "runs/adamw_traj")]).fit(mini_model, data)
    """

    def __init__(
        self,
        mode: str,
        dirpath: str | os.PathLike | None = None,
        every_n_steps: int = 50,
        shadow_hparams: dict[str, Any] | None = None,
    ) -> None:
        check_choice("mode", mode, MODES)
        if mode != "shadow" and dirpath is None:
            raise ValueError(f"TrajectoryDistance(mode={mode!r}) needs the snapshots' directory: pass dirpath=...")
        if mode == "shadow" and dirpath is not None:
            raise ValueError("TrajectoryDistance(mode='shadow') keeps its reference in memory and takes no dirpath.")
        if mode != "shadow" and shadow_hparams:
            raise ValueError(f"shadow_hparams only applies to mode='shadow', got it with mode={mode!r}.")
        check_positive_int("every_n_steps", every_n_steps)
        self.mode = mode
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps = every_n_steps
        self.shadow_hparams = dict(shadow_hparams or {})
        self.last: Distance | None = None
        self.shadow: ShadowAdamW | None = None
        self._shadow_state: dict[str, Any] | None = None
        self._snapshots: dict[int, Path] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._kinds: dict[str, str] = {}
        self._hook: Any = None
        self._last_step: int | None = None
        self._measured_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, dirpath=str(self.dirpath) if self.dirpath else None)

    # ---- hooks ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.mode == "compare":
            self._snapshots = list_snapshots(self.dirpath)
            if not self._snapshots:
                raise FileNotFoundError(
                    f"TrajectoryDistance(mode='compare') found no snapshots in {str(self.dirpath)!r} "
                    f"({'the directory does not exist' if not self.dirpath.is_dir() else 'no step_<n> directories'}). "
                    "Record them first in an AdamW run with TrajectoryDistance('record', dirpath=...)."
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._names = parameter_names(pl_module, trainer.optimizers)
        self._kinds = {self._names[p]: k for optimizer in trainer.optimizers for p, k in param_kinds(optimizer).items()}
        if self.mode == "shadow":
            self._start_shadow(trainer)
        self._last_step = trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self._at_step(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step on this batch
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            self._at_step(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self._measured_step != step:
            if self.mode == "compare" and step not in list_snapshots(self.dirpath):
                rank_zero_warn(
                    f"TrajectoryDistance(mode='compare'): no snapshot after the last step ({step}) in "
                    f"{str(self.dirpath)!r}, so the last distance is the one at step {self._measured_step}. "
                    "Record with as many steps as this run to measure the end."
                )
            else:
                self._at_step(trainer, step)
        self._remove_hook()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    # ---- work ----------------------------------------------------------------------------------

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: p for p, name in self._names.items()}

    def _at_step(self, trainer: pl.Trainer, step: int) -> None:
        self._measured_step = step
        weights = self._weights()
        if self.mode == "record":
            save_snapshot(weights, snapshot_path(self.dirpath, step))
            return
        if self.mode == "compare":
            reference = load_snapshot(self._snapshot(step), like=weights)
        else:
            reference = self.shadow.weights
        self.last = distance = weight_distance(weights, reference, self._kinds)
        if self.mode == "compare" and step == 0 and distance.l2 > 0:
            rank_zero_warn(
                f"TrajectoryDistance: the initial weights differ from the recording's (L2 {distance.l2:.3g}); "
                "start both runs from the same seed (seed_everything) and the same model code, or the distance "
                "measures the initialisation, not the optimizer."
            )
        tag = f"{TAG}/{self.mode}"
        log_scalars(trainer, {f"{tag}/rel_l2": distance.rel_l2, f"{tag}/l2": distance.l2}, step)
        log_series(trainer, f"{tag}/rel_l2_by_kind", {kind: rel for kind, (_, rel) in distance.by_kind.items()}, step)

    def _snapshot(self, step: int) -> Path:
        if step not in self._snapshots:
            self._snapshots = list_snapshots(self.dirpath)
        if step not in self._snapshots:
            steps = sorted(self._snapshots)
            shown = ", ".join(map(str, steps[:10])) + (f", ... {steps[-1]}" if len(steps) > 10 else "")
            raise FileNotFoundError(
                f"TrajectoryDistance(mode='compare') needs the snapshot after step {step} "
                f"({snapshot_path(self.dirpath, step)}), but {str(self.dirpath)!r} holds steps [{shown}]. Record with "
                f"the same every_n_steps ({self.every_n_steps}) and at least as many steps as this run."
            )
        return self._snapshots[step]

    def _start_shadow(self, trainer: pl.Trainer) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"TrajectoryDistance(mode='shadow') mirrors one optimizer; this model has {len(trainer.optimizers)}."
            )
        optimizer = trainer.optimizers[0]
        self.shadow = ShadowAdamW(optimizer, self._names, self.shadow_hparams)
        if self._shadow_state is not None:
            self.shadow.load_state_dict(self._shadow_state)
            self._shadow_state = None
        self._remove_hook()
        self._hook = optimizer.register_step_post_hook(lambda *_: self.shadow.step())

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---- layout and state ----------------------------------------------------------------------

    def charts(self, trainer: pl.Trainer) -> Layout:
        if self.mode == "record":
            return {}
        tag = f"{TAG}/{self.mode}"
        return {
            f"{PREFIX}: distance to AdamW's trajectory": {
                f"relative L2 distance to AdamW ({self.mode})": ["Multiline", [rf"^{tag}/rel_l2$"]],
                f"relative L2 distance to AdamW by block kind ({self.mode})": ["Multiline", [rf"^{tag}/rel_l2_by_kind$"]],
                f"L2 distance to AdamW ({self.mode})": ["Multiline", [rf"^{tag}/l2$"]],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        if self.mode != "shadow":
            return {}
        if self.shadow is not None:
            return {"shadow": self.shadow.state_dict()}
        return {"shadow": self._shadow_state} if self._shadow_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shadow = state_dict.get("shadow")
        if shadow is None:
            return
        if self.shadow is not None:
            self.shadow.load_state_dict(shadow)
        else:
            self._shadow_state = shadow
