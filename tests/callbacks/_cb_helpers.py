"""Shared pieces of the callback tests: a tiny GPT LightningModule, its data, and a TensorBoard reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.optim import AdamMini, Eve, MicroAdam

VOCAB, SEQ = 32, 16


def tiny_config(**overrides: Any) -> GPTConfig:
    """One block, 2 heads of 16: every block kind (Q/K heads, row, tensor norms, full biases) in 14k parameters."""
    return GPTConfig.tiny(**{"vocab_size": VOCAB, "block_size": SEQ, "n_layer": 1, "n_head": 2, "n_embd": 32, **overrides})


def markov_tokens(num_sequences: int, seed: int = 0) -> TensorDataset:
    """Sequences of a fixed random Markov chain (each token has 3 likely successors): a learnable task."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(VOCAB, (VOCAB, 3), generator=g)
    tokens = torch.empty(num_sequences, SEQ + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (num_sequences,), generator=g)
    for t in range(1, SEQ + 1):
        choice = torch.randint(3, (num_sequences,), generator=g)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def loader(num_sequences: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(markov_tokens(num_sequences, seed), batch_size=batch_size, shuffle=False)


class TinyGPT(L.LightningModule):
    """A one-block GPT whose optimizer is chosen by name; batches can be made to spike or turn NaN.

    Args:
        optimizer: ``"adamw"``, ``"adam_mini"``, ``"eve"``, ``"micro_adam"`` or ``"sgd"``.
        spike_batches: ``batch_idx`` values whose loss is multiplied by ``spike_factor``.
        nan_batches: ``batch_idx`` values whose loss becomes NaN.
        spike_rank: only this global rank spikes (``None``: every rank).
        scheduler_gamma: an ``ExponentialLR`` schedule stepped every step (``None``: no scheduler).
        seed: seeds the initial weights.
    """

    def __init__(
        self,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        spike_batches: tuple[int, ...] = (),
        nan_batches: tuple[int, ...] = (),
        spike_factor: float = 30.0,
        spike_rank: int | None = None,
        config: GPTConfig | None = None,
        scheduler_gamma: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same initial weights whatever ran before
        self.model = GPT(config or tiny_config())
        self.optimizer_name = optimizer
        self.lr, self.weight_decay = lr, weight_decay
        self.spike_batches, self.nan_batches = set(spike_batches), set(nan_batches)
        self.spike_factor, self.spike_rank = spike_factor, spike_rank
        self.scheduler_gamma = scheduler_gamma
        self.losses: dict[int, float] = {}  # batch_idx -> the loss training_step returned

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        if self.spike_rank is None or self.global_rank == self.spike_rank:
            if batch_idx in self.spike_batches:
                loss = loss * self.spike_factor
            if batch_idx in self.nan_batches:
                loss = loss * float("nan")
        self.log("train_loss", loss)
        self.losses[batch_idx] = loss.item()
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer()
        if self.scheduler_gamma is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.scheduler_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _optimizer(self) -> torch.optim.Optimizer:
        name, lr, wd = self.optimizer_name, self.lr, self.weight_decay
        if name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=wd)
        if name == "adam_mini":
            return AdamMini(self, lr=lr, weight_decay=wd, backend="torch")
        if name == "eve":
            return Eve(self, lr=lr, weight_decay=wd, backend="torch")
        if name == "micro_adam":
            return MicroAdam(self.named_parameters(), lr=lr, weight_decay=wd, min_compressed_numel=256, backend="torch")
        if name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        raise ValueError(name)


def trainer(tmp_path: Path, callbacks: list, name: str = "run", **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer that logs to TensorBoard under ``tmp_path/name``."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=TensorBoardLogger(str(tmp_path), name=name, version=0),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class Events:
    """The scalars, texts and histograms of a TensorBoard log directory, read back with tensorboard's reader."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0, TENSORS: 0, HISTOGRAMS: 0})
        self.acc.Reload()

    def series(self, tag: str) -> dict[str, dict[int, float]]:
        """``series -> step -> value`` of a quantity logged with one run per series (``SummaryWriter.add_scalars``)."""
        prefix = tag.replace("/", "_") + "_"
        out = {}
        for run in sorted(self.logdir.iterdir()):
            if run.is_dir() and run.name.startswith(prefix):
                out[run.name[len(prefix):]] = Events(run).scalars(tag)
        return out

    def tags(self, kind: str = "scalars") -> list[str]:
        return sorted(self.acc.Tags()[kind])

    def scalars(self, tag: str) -> dict[int, float]:
        """``step -> value`` (the last one written at a step)."""
        return {e.step: e.value for e in self.acc.Scalars(tag)}

    def texts(self, tag: str) -> dict[int, str]:
        return {e.step: e.tensor_proto.string_val[0].decode() for e in self.acc.Tensors(tag)}

    def histogram(self, tag: str) -> dict[int, Any]:
        return {e.step: e.histogram_value for e in self.acc.Histograms(tag)}

    def layout(self) -> Any:
        from tensorboard.plugins.custom_scalar import layout_pb2

        event = self.acc.Tensors("custom_scalars__config__")[-1]
        return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


class UpdateProbe(L.Callback):
    """Records whether the weights and the optimizer state are bit-identical across batch ``batch``."""

    def __init__(self, batch: int) -> None:
        self.batch, self.before, self.identical, self.sharded = batch, None, None, None

    @staticmethod
    def snapshot(trainer: L.Trainer) -> list[torch.Tensor]:
        optimizer = trainer.optimizers[0]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = [_local(v) for p in params for v in optimizer.state[p].values() if torch.is_tensor(v)]
        return [_local(p) for p in params] + state

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch:
            self.before = self.snapshot(trainer)
            self.sharded = all(isinstance(p, DTensor) for p in module.parameters())

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch:
            after = self.snapshot(trainer)
            self.identical = len(after) == len(self.before) and all(torch.equal(a, b) for a, b in zip(after, self.before))
