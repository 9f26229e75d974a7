"""LossSpikeMonitor in real Lightning runs: skip, NaN, lr backoff, raise, accumulation, resume, no false positives."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _cb_helpers import Events, TinyGPT, UpdateProbe, loader, tiny_config, trainer
from lightning.fabric.utilities.spike import TrainingSpikeException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lowmem.callbacks import LossSpikeError, LossSpikeMonitor
from lightning_lowmem.data import CharTextDataModule

SPIKE = 30


def run(tmp_path: Path, module: TinyGPT, callbacks: list, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0)
    t = trainer(tmp_path, callbacks, **kwargs)
    t.fit(module, loader(num_sequences=kwargs.pop("num_sequences", 320)))
    return t


@pytest.mark.parametrize("optimizer", ["adamw", "adam_mini"])
def test_injected_spike_is_skipped_with_weights_and_state_bit_identical(tmp_path: Path, optimizer: str) -> None:
    monitor = LossSpikeMonitor(action="skip", warmup=20)
    at_spike, after_spike = UpdateProbe(SPIKE), UpdateProbe(SPIKE + 1)
    module = TinyGPT(optimizer, spike_batches=(SPIKE,))
    run(tmp_path, module, [monitor, at_spike, after_spike], max_steps=SPIKE + 3)

    assert at_spike.identical is True  # weights, exp_avg, exp_avg_sq and step untouched
    assert after_spike.identical is False  # training goes on
    assert monitor.count == 1
    (event,) = monitor.events
    assert event["step"] == SPIKE and event["action"] == "skip" and event["batch_indices"] == [SPIKE]
    assert event["loss"] == pytest.approx(module.losses[SPIKE])

    events = Events(tmp_path / "run" / "version_0")
    count = events.scalars("lowmem/spikes/count")
    assert count[SPIKE] == 1 and count[SPIKE - 1] == 0
    assert events.scalars("lowmem/spikes/loss")[SPIKE] == pytest.approx(module.losses[SPIKE], rel=1e-6)
    assert events.scalars("lowmem/spikes/z")[SPIKE] > 6
    (text,) = events.texts("lowmem/spikes/events/text_summary").items()
    assert text[0] == SPIKE and "**skip**" in text[1] and f"batches [{SPIKE}]" in text[1]


def test_zeroed_gradients_would_not_skip_an_adamw_update() -> None:
    """Why the skip sets gradients to None: with zero gradients AdamW still moves the weights."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.randn(4, 3)
    optimizer.step()
    before = w.detach().clone()
    w.grad = torch.zeros(4, 3)
    optimizer.step()
    assert not torch.equal(w, before)  # momentum and weight decay
    before, state = w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}
    w.grad = None
    optimizer.step()
    assert torch.equal(w, before) and all(torch.equal(optimizer.state[w][k], v) for k, v in state.items())


def test_no_false_positive_over_a_normal_run(tmp_path: Path) -> None:
    """300 steps of a byte-level GPT on real text with the default settings: not one spike."""
    monitor = LossSpikeMonitor()
    data = CharTextDataModule(block_size=32, batch_size=8, seed=0)
    module = TinyGPT("adam_mini", config=tiny_config(vocab_size=256, block_size=32))
    L.seed_everything(0)
    t = trainer(tmp_path, [monitor], max_steps=300, log_every_n_steps=50, gradient_clip_val=1.0)
    t.fit(module, datamodule=data)
    assert t.global_step == 300
    assert monitor.count == 0 and monitor.events == []
    assert monitor.detector.stats["loss"].count == 300
    events = Events(tmp_path / "run" / "version_0")
    assert set(events.scalars("lowmem/spikes/count").values()) == {0.0}
    assert "lowmem/spikes/events/text_summary" not in events.tags("tensors")
    zscores = events.series("lowmem/spikes/zscore")
    assert set(zscores) == {"loss", "grad_norm"} and sorted(zscores["loss"]) == [50, 100, 150, 200, 250]  # not at step 0
    assert max(zscores["loss"].values()) < 6


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_nan_loss_is_caught_before_it_reaches_the_weights(tmp_path: Path, skip_nonfinite: bool) -> None:
    monitor = LossSpikeMonitor(action="log", skip_nonfinite=skip_nonfinite)  # default warmup 50: still warming up
    probe = UpdateProbe(3)
    t = run(tmp_path, TinyGPT("adamw", nan_batches=(3,)), [monitor, probe], max_steps=6)
    event = monitor.events[0]
    assert event["step"] == 3 and event["reason"] == "non-finite loss and grad_norm"
    finite = all(torch.isfinite(x).all() for x in probe.snapshot(t))
    if skip_nonfinite:
        assert event["action"] == "skip" and probe.identical and finite
        assert len(monitor.events) == 1 and monitor.detector.stats["loss"].count == 5
    else:  # "log" alone lets the NaN in, and every later step is NaN: what skip_nonfinite protects against
        assert event["action"] == "log" and not finite
        assert [e["step"] for e in monitor.events] == [3, 4, 5] and monitor.detector.stats["loss"].count == 3
    assert math.isfinite(monitor.detector.stats["loss"].mean)  # NaN never enters the statistics


class LrProbe(L.Callback):
    """The learning rate each optimizer step ran with (read by an optimizer post-hook)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_post_hook(lambda *_: self.lrs.append(optimizer.param_groups[0]["lr"]))


def test_lr_backoff_scales_the_next_updates_then_restores_the_schedule(tmp_path: Path) -> None:
    base, gamma = 3e-3, 0.99
    lrs = LrProbe()
    monitor = LossSpikeMonitor(action="lr_backoff", warmup=20, backoff_factor=0.1, backoff_steps=3)
    module = TinyGPT("adamw", lr=base, spike_batches=(SPIKE,), scheduler_gamma=gamma)
    t = run(tmp_path, module, [lrs, monitor], max_steps=SPIKE + 6)
    expected = [base * gamma**k * (0.1 if SPIKE <= k < SPIKE + 3 else 1.0) for k in range(SPIKE + 6)]
    assert lrs.lrs == pytest.approx(expected, rel=1e-12)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(base * gamma ** (SPIKE + 6), rel=1e-12)
    assert monitor.count == 1 and monitor.events[0]["action"] == "lr_backoff" and monitor.backoff_remaining == 0


def test_raise_writes_the_step_batches_and_averages_micro_batches(tmp_path: Path) -> None:
    path = tmp_path / "bad" / "skip.json"
    path.parent.mkdir()
    path.write_text("[3]")  # an earlier run's list is extended
    monitor = LossSpikeMonitor(action="raise", warmup=10, exclude_batches_path=path)
    module = TinyGPT("adamw", spike_batches=(31,))
    with pytest.raises(LossSpikeError, match=r"Loss spike at step 15 \(batches \[30, 31\]\): loss z=") as err:
        run(tmp_path, module, [monitor], max_steps=19, accumulate_grad_batches=2)
    assert isinstance(err.value, TrainingSpikeException) and err.value.batch_idx == 31
    assert json.loads(path.read_text()) == [3, 30, 31]
    (event,) = monitor.events
    # the decision's loss is the mean of the step's micro-batch losses
    assert event["loss"] == pytest.approx((module.losses[30] + module.losses[31]) / 2, rel=1e-6)
    assert event["action"] == "raise"


def test_consecutive_spikes_raise(tmp_path: Path) -> None:
    monitor = LossSpikeMonitor(action="skip", warmup=10, max_consecutive=3)
    with pytest.raises(LossSpikeError, match="3 consecutive loss spikes up to step 17"):
        run(tmp_path, TinyGPT("adamw", spike_batches=(15, 16, 17, 18)), [monitor], max_steps=30)


def test_resume_keeps_the_statistics(tmp_path: Path) -> None:
    """Two epochs straight, or one epoch and a resume: the same statistics and spike count."""

    def fit(name: str, epochs: int, ckpt_path: str | None = None) -> tuple[LossSpikeMonitor, ModelCheckpoint]:
        monitor = LossSpikeMonitor(action="skip", warmup=3)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"{name}_ckpt", every_n_epochs=1, save_top_k=-1)
        L.seed_everything(0)
        t = trainer(tmp_path, [monitor, checkpoint], name=name, max_epochs=epochs, max_steps=-1, enable_checkpointing=True)
        t.fit(TinyGPT("adamw", spike_batches=(5,)), loader(num_sequences=64), ckpt_path=ckpt_path)
        return monitor, checkpoint

    straight, _ = fit("straight", 2)
    first, checkpoint = fit("first", 1)
    (ckpt,) = (tmp_path / "first_ckpt").glob("*.ckpt")
    resumed, _ = fit("resumed", 2, ckpt_path=str(ckpt))
    assert first.count == 1 and straight.count == 2  # batch 5 of each epoch spikes
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.detector.stats["loss"].count == 14


def test_needs_a_logger(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="Cannot use `LossSpikeMonitor` callback with `Trainer` that has no logger"):
        run(tmp_path, TinyGPT(), [LossSpikeMonitor()], logger=False, max_steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(action="ignore"), r"Invalid action: 'ignore'; choose one of 'log', 'skip', 'lr_backoff', 'raise'"),
        (dict(monitor="accuracy"), r"monitor must be a non-empty selection"),
        (dict(backoff_factor=1.0), r"backoff_factor must be in \(0, 1\), got 1.0"),
        (dict(backoff_factor=math.nan), "got nan"),
        (dict(backoff_steps=0), "backoff_steps must be an int >= 1, got 0"),
        (dict(max_consecutive=0), "max_consecutive must be an int >= 1, got 0"),
        (dict(threshold=-1.0), "threshold must be a positive finite z-score"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossSpikeMonitor(**kwargs)
