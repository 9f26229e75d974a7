"""Train a small GPT with a low-memory optimizer, and see how much optimizer state it saved.

The model learns to predict the next byte of the Python standard library's docstrings (built on
first use, no download). The optimizer (AdamMini by default) is built by ``LowMemOptimizerMixin``
from the ``optim`` section of the config, so changing optimizer is a command-line override:

    python examples/train_gpt.py                                          # ~1-2 minutes on a CPU
    python examples/train_gpt.py optim.name=eve optim.lr=3e-4 trainer.max_steps=50
    python examples/train_gpt.py ckpt_path=runs/gpt_tiny/version_0/checkpoints/last.ckpt
    python examples/train_gpt.py config=my_config.yaml                   # another config file
    tensorboard --logdir runs

Every key of ``examples/configs/gpt_tiny.yaml`` can be overridden as ``key=value``.
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
from lightning_lowmem.data import CharTextDataModule
from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM
from lightning_lowmem.utils import optimizer_state_bytes

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "gpt_tiny.yaml"


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
    trainer = L.Trainer(logger=logger, callbacks=[checkpoint], **cfg.trainer)
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
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {cfg.log_dir})")
    print(f"checkpoints: {checkpoint.dirpath}")


if __name__ == "__main__":
    main(sys.argv[1:])
