"""Train a small GPT with a low-memory optimizer, and see what it saved and what it cost.

The model learns to predict the next byte of the Python standard library's docstrings (built on
first use, no download). The optimizer (AdamMini by default) is built by ``LowMemOptimizerMixin``
from the ``optim`` section of the config, so changing optimizer is a command-line override:

    python examples/train_gpt.py                                          # about a minute on a CPU
    python examples/train_gpt.py optim.name=eve optim.lr=3e-4 trainer.max_steps=50
    python examples/train_gpt.py ckpt_path=runs/gpt_tiny/version_0/checkpoints/last.ckpt
    python examples/train_gpt.py config=my_config.yaml                   # another config file
    python examples/train_gpt.py callbacks.trajectory=null                # leave a callback out
    tensorboard --logdir runs

Every key of ``examples/configs/gpt_tiny.yaml`` can be overridden as ``key=value``.

The four ``lightning_lowmem.callbacks`` run at their default intervals and write TensorBoard charts
under ``lowmem/`` (grouped in the "Custom Scalars" tab): the optimizer state's bytes by block kind
against fp32 AdamW (``OptimizerStateMonitor``), the distance of the weights to an AdamW copy fed the
same gradients (``TrajectoryDistance("shadow")``), loss spikes, skipped before they reach the weights
(``LossSpikeMonitor``), and effective learning rates per block kind (``OptimizerDiagnostics``).
"""

import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from lightning_lowmem import LowMemOptimizerMixin
from lightning_lowmem.callbacks import LossSpikeMonitor, OptimizerDiagnostics, OptimizerStateMonitor, TrajectoryDistance
from lightning_lowmem.data import CharTextDataModule
from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM
from lightning_lowmem.utils import optimizer_state_bytes

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "gpt_tiny.yaml"
# The keys of the config's ``callbacks`` section; a key set to null leaves its callback out.
CALLBACKS = {
    "state_monitor": OptimizerStateMonitor,
    "trajectory": TrajectoryDistance,
    "spikes": LossSpikeMonitor,
    "diagnostics": OptimizerDiagnostics,
}


class LitGPT(LowMemOptimizerMixin, L.LightningModule):
    """A GPT whose optimizer and lr schedule the mixin builds from ``optim`` (see ``OptimConfig``)."""

    def __init__(self, model: dict, optim: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the mixin reads self.hparams.optim
        self.gpt = GPT(GPTConfig(**model))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.gpt(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.gpt(x, y)
        self.log("val/loss", loss, prog_bar=True)


def main(argv: list[str]) -> None:
    cli = OmegaConf.from_cli(argv)
    cfg = OmegaConf.merge(OmegaConf.load(cli.pop("config", DEFAULT_CONFIG)), cli)
    L.seed_everything(cfg.seed)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)

    data = CharTextDataModule(**cfg.data)
    model = LitGPT(model=OmegaConf.to_container(cfg.model, resolve=True),
                   optim=OmegaConf.to_container(cfg.optim, resolve=True))
    logger = TensorBoardLogger(cfg.log_dir, name=cfg.run_name)
    checkpoint = ModelCheckpoint(monitor="val/loss", save_last=True)  # best and last, under the log dir
    lowmem = {name: CALLBACKS[name](**args) for name, args in OmegaConf.to_container(cfg.callbacks).items()
              if args is not None}
    trainer = L.Trainer(logger=logger, callbacks=[checkpoint, *lowmem.values()], **cfg.trainer)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.ckpt_path)
    val_loss = trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]

    # Optimizer state the run really holds, against fp32 AdamW's 8 bytes per trainable parameter.
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = optimizer_state_bytes(trainer.optimizers[0])
    adamw = ADAMW_STATE_BYTES_PER_PARAM * params
    print(f"\nfinal validation loss: {val_loss:.4f} ({val_loss / math.log(2):.3f} bits per byte)")
    print(f"optimizer state: {cfg.optim.name} {state / 1e6:.2f} MB = {state / params:.2f} bytes/param, "
          f"fp32 AdamW {adamw / 1e6:.2f} MB = {ADAMW_STATE_BYTES_PER_PARAM:.2f} bytes/param "
          f"({1 - state / adamw:.1%} saved)")
    trajectory = lowmem.get("trajectory")
    if trajectory is not None and trajectory.last is not None:
        step = trainer.global_step // trajectory.every_n_steps * trajectory.every_n_steps  # its last measurement
        print(f"distance to AdamW's trajectory ({trajectory.mode}) at step {step}: "
              f"relative L2 {trajectory.last.rel_l2:.4f}")
    if "spikes" in lowmem:
        print(f"loss spikes: {lowmem['spikes'].count} (action: {lowmem['spikes'].action})")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {cfg.log_dir})")
    print(f"checkpoints: {checkpoint.dirpath}")


if __name__ == "__main__":
    main(sys.argv[1:])
