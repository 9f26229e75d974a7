"""Train a small GPT with a low-memory optimizer, and see what it saved and what it cost.

The model learns to predict the next byte of the Python standard library's docstrings (built on
first use, no download). The optimizer (AdamMini by default) is built by ``LowMemOptimizerMixin``
from the ``optim`` section of the config, so changing optimizer is a command-line override:

    python examples/train_gpt.py                                          # about a minute on a CPU
    python examples/train_gpt.py --help                                   # every key and its default
    python examples/train_gpt.py trainer.max_steps=5                      # a smoke run
    python examples/train_gpt.py optim.name=eve optim.lr=3e-4 trainer.max_steps=50
    python examples/train_gpt.py ckpt_path=runs/gpt_tiny/adam_mini/version_0/checkpoints/last.ckpt
    python examples/train_gpt.py config=my_config.yaml                   # another config file
    python examples/train_gpt.py callbacks.trajectory=null                # leave a callback out
    tensorboard --logdir runs

Every key of ``examples/configs/gpt_tiny.yaml`` can be overridden as ``key=value``, and
``trainer.<name>`` takes any ``lightning.Trainer`` argument; a key that is none of these is an error
that names the closest valid ones. Runs are named after the optimizer:
``runs/gpt_tiny/adam_mini/version_0``, so ``tensorboard --logdir runs`` lays optimizers side by side.

The four ``lightning_lowmem.callbacks`` write TensorBoard charts under ``lowmem/`` (grouped in the
"Custom Scalars" tab): the optimizer state in MB by block kind against fp32 AdamW
(``OptimizerStateMonitor``), the distance of the weights to an AdamW copy fed the same gradients
(``TrajectoryDistance("shadow")``), loss spikes, skipped before they reach the weights
(``LossSpikeMonitor``), and effective learning rates per block kind (``OptimizerDiagnostics``).
"""

import dataclasses
import difflib
import inspect
import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lightning_lowmem import LowMemOptimizerMixin, OptimConfig, SchedulerConfig
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


def valid_keys(cfg: DictConfig) -> set[str]:
    """Every dotted key a config may set: the default config's, and each section's class arguments."""
    keys = {k for k in _flatten(OmegaConf.to_container(cfg)) if not k.startswith(("trainer.", "callbacks."))}
    keys |= {f"data.{n}" for n in _arguments(CharTextDataModule)}
    keys |= {f"model.{f.name}" for f in dataclasses.fields(GPTConfig)}
    keys |= {f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)}
    keys |= {f"optim.scheduler.{f.name}" for f in dataclasses.fields(SchedulerConfig)}
    keys |= {f"trainer.{n}" for n in _arguments(L.Trainer)}
    for name, cls in CALLBACKS.items():
        keys |= {f"callbacks.{name}"} | {f"callbacks.{name}.{n}" for n in _arguments(cls)}
    return keys | {"config"}


def check_keys(cfg: DictConfig, where: str) -> None:
    """Exit with an error naming the closest valid keys if ``cfg`` sets a key no section takes."""
    valid = valid_keys(OmegaConf.load(DEFAULT_CONFIG))
    for key in _flatten(OmegaConf.to_container(cfg)):
        if key in valid or any(key.startswith(v + ".") for v in valid if v.startswith("optim.rules")):
            continue
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        close += [v for v in sorted(valid) if v.endswith("." + leaf) and v not in close][:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        usage_error(f"unknown key {key!r} in {where}{hint} (--help lists the keys and their defaults)")


def usage_error(message: str) -> None:
    print(f"train_gpt.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _flatten(tree: object, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict) or not tree:
        return [prefix[:-1]] if prefix else []
    return [k for key, value in tree.items() for k in _flatten(value, f"{prefix}{key}.")]


def _arguments(cls: type) -> list[str]:
    return [n for n, p in inspect.signature(cls).parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def fit_warmup(cfg: DictConfig) -> None:
    """A run shorter than the warmup (a smoke run) warms up for a tenth of its steps instead."""
    scheduler, max_steps = cfg.optim.scheduler, cfg.trainer.get("max_steps", -1)
    if scheduler.name != "none" and 0 < max_steps <= scheduler.warmup_steps:
        clipped = max_steps // 10
        print(f"optim.scheduler.warmup_steps={scheduler.warmup_steps} does not fit in trainer.max_steps={max_steps}: "
              f"warming up for {clipped} steps instead")
        scheduler.warmup_steps = clipped


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        print(f"Keys and their defaults ({DEFAULT_CONFIG}), each settable as key=value:\n")
        print(DEFAULT_CONFIG.read_text())
        return
    bad = [arg for arg in argv if "=" not in arg]
    if bad:
        usage_error(f"expected key=value arguments, got {' '.join(bad)} (--help lists the keys and their defaults)")
    cli = OmegaConf.from_cli(argv)
    check_keys(cli, "the command line")
    config_file = cli.pop("config", DEFAULT_CONFIG)
    file_cfg = OmegaConf.load(config_file)
    check_keys(file_cfg, str(config_file))
    cfg = OmegaConf.merge(file_cfg, cli)
    fit_warmup(cfg)
    L.seed_everything(cfg.seed)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)

    data = CharTextDataModule(**cfg.data)
    model = LitGPT(model=OmegaConf.to_container(cfg.model, resolve=True),
                   optim=OmegaConf.to_container(cfg.optim, resolve=True))
    # runs/gpt_tiny/adam_mini/version_0: one run per optimizer; no hp_metric placeholder chart
    logger = TensorBoardLogger(cfg.log_dir, name=f"{cfg.run_name}/{cfg.optim.name}", default_hp_metric=False)
    checkpoint = ModelCheckpoint(monitor="val/loss", save_last=True)  # best and last, under the log dir
    lowmem = {name: CALLBACKS[name](**args) for name, args in OmegaConf.to_container(cfg.callbacks).items()
              if args is not None}
    trainer = L.Trainer(logger=logger, callbacks=[checkpoint, *lowmem.values()], **cfg.trainer)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.ckpt_path)
    # The final validation, not logged: the run's charts already hold the validations of the fit.
    trainer.loggers = []
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
        print(f"distance to AdamW's trajectory ({trajectory.mode}) at step {trainer.global_step}: "
              f"relative L2 {trajectory.last.rel_l2:.4f}")
    if "spikes" in lowmem:
        print(f"loss spikes: {lowmem['spikes'].count} (action: {lowmem['spikes'].action})")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {cfg.log_dir})")
    print(f"checkpoints: {checkpoint.dirpath}")


if __name__ == "__main__":
    main(sys.argv[1:])
