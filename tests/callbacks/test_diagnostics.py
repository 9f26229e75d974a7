"""OptimizerDiagnostics: effective learning rates, update ratios, gradient norm, layout, read back from TensorBoard."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _cb_helpers import Events, TinyGPT, loader, trainer

from lightning_lowmem.callbacks import LossSpikeMonitor, OptimizerDiagnostics, OptimizerStateMonitor, TrajectoryDistance
from lightning_lowmem.callbacks.core import layer_group, quantile_names, state_segments

LAST = 5  # the one diagnosed step (step 0 never is); step 5 is the last, so the final state is the one it logged


class Probe(L.Callback):
    """The gradient norm before clipping and the weights around the update of step LAST."""

    def __init__(self) -> None:
        self.grad_norm, self.before, self.after = None, None, None

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == LAST:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            self.grad_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])).item()
            self.before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == LAST + 1:
            self.after = {n: p.detach().clone() for n, p in module.named_parameters()}


def expected_log10_relative_lrs(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """log10(effective lr / lr) per kind, straight from the state, split by the optimizer's segments."""
    segments = state_segments(optimizer)
    out: dict[str, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        beta2, lr, eps = group["betas"][1], group["lr"], group["eps"]
        for p in group["params"]:
            state = optimizer.state[p]
            eff = lr / ((state["exp_avg_sq"].double() / (1 - beta2 ** state["step"].item())).sqrt() + eps)
            parts = eff.reshape(-1).split([s.entries for s in segments[p]])
            for seg, part in zip(segments[p], parts, strict=True):
                out.setdefault(seg.kind, []).append((part / lr).log10())
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("name", ["adamw", "adam_mini"])
def test_values_match_the_optimizer_state(tmp_path: Path, name: str) -> None:
    probe = Probe()
    diagnostics = OptimizerDiagnostics(every_n_steps=LAST, quantiles=(0.01, 0.25, 0.5, 0.99), max_samples=10**6)
    L.seed_everything(0)
    t = trainer(tmp_path, [probe, diagnostics], max_steps=LAST + 1, gradient_clip_val=0.05)
    t.fit(TinyGPT(name), loader())
    events = Events(tmp_path / "run" / "version_0")

    expected = expected_log10_relative_lrs(t.optimizers[0])
    assert set(expected) == ({"full"} if name == "adamw" else {"full", "row", "head", "tensor"})
    for kind, values in expected.items():
        for q, tag in zip((0.01, 0.25, 0.5, 0.99), ("p01", "p25", "p50", "p99")):
            logged = events.scalars(f"lowmem/diagnostics/log10_relative_lr/{kind}/{tag}")
            assert sorted(logged) == [LAST]
            assert logged[LAST] == pytest.approx(torch.quantile(values, q).item(), rel=1e-5), (kind, tag)
        histogram = events.histogram(f"lowmem/diagnostics/log10_relative_lr/{kind}")[LAST]
        assert histogram.num == values.numel()  # every block, once
        assert histogram.min == pytest.approx(values.min().item(), rel=1e-6)
        assert histogram.max == pytest.approx(values.max().item(), rel=1e-6)
    if name == "adam_mini":
        assert expected["head"].numel() == 4  # Q and K: 2 heads each

    # the gradient norm before clipping (clip at 0.05 is far below it)
    assert events.scalars("lowmem/diagnostics/grad_norm")[LAST] == pytest.approx(probe.grad_norm, rel=1e-5)
    assert probe.grad_norm > 0.5

    groups: dict[str, list[float]] = {}
    for n, w in probe.before.items():
        acc = groups.setdefault(layer_group(n), [0.0, 0.0])
        acc[0] += (probe.after[n] - w).double().square().sum().item()
        acc[1] += w.double().square().sum().item()
    assert set(groups) == {"model.transformer.wte", "model.transformer.wpe", "model.transformer.h.0", "model.transformer.ln_f"}
    ratios = events.series("lowmem/diagnostics/update_ratio")
    assert set(ratios) == set(groups)
    for group, (d, w) in groups.items():
        assert sorted(ratios[group]) == [LAST]
        assert ratios[group][LAST] == pytest.approx((d / w) ** 0.5, rel=1e-5), group


def test_sampling_bounds_the_cost(tmp_path: Path) -> None:
    L.seed_everything(0)
    t = trainer(tmp_path, [OptimizerDiagnostics(every_n_steps=2, max_samples=16)], max_steps=4)
    t.fit(TinyGPT("adamw"), loader())
    events = Events(tmp_path / "run" / "version_0")
    histogram = events.histogram("lowmem/diagnostics/log10_relative_lr/full")
    # every 2 steps from step 2, and the last update (index 3); never step 0
    assert sorted(histogram) == [2, 3] and all(h.num == 16 for h in histogram.values())


def test_micro_adam_has_no_effective_lr_for_compressed_parameters(tmp_path: Path) -> None:
    L.seed_everything(0)
    t = trainer(tmp_path, [OptimizerDiagnostics(every_n_steps=2)], max_steps=3)
    t.fit(TinyGPT("micro_adam"), loader())
    tags = Events(tmp_path / "run" / "version_0").tags()
    kinds = {tag.split("/")[3] for tag in tags if tag.startswith("lowmem/diagnostics/log10_relative_lr/")}
    assert kinds == {"full"}
    assert "lowmem/diagnostics/grad_norm" in tags


def test_one_layout_groups_every_lowmem_chart(tmp_path: Path) -> None:
    callbacks = [
        OptimizerStateMonitor(every_n_steps=2),
        TrajectoryDistance("shadow", every_n_steps=2),
        LossSpikeMonitor(),
        OptimizerDiagnostics(every_n_steps=2),
    ]
    L.seed_everything(0)
    t = trainer(tmp_path, callbacks, max_steps=4)
    t.fit(TinyGPT("adam_mini"), loader())
    events = Events(tmp_path / "run" / "version_0")
    layout = events.layout()
    titles = [c.title for c in layout.category]
    assert titles == [
        "lowmem: optimizer state",
        "lowmem: distance to AdamW's trajectory",
        "lowmem: loss spikes",
        "lowmem: optimizer diagnostics",
    ]
    series = {"lowmem/state/mb_by_kind", "lowmem/trajectory/shadow/rel_l2_by_kind", "lowmem/spikes/zscore",
              "lowmem/diagnostics/update_ratio"}
    assert all(events.series(tag) for tag in series)
    scalars = set(events.tags()) | series
    lowmem = {tag for tag in scalars if tag.startswith("lowmem/")}
    covered = set()
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                for series in chart.margin.series:
                    assert {series.value, series.lower, series.upper} <= scalars  # margin charts name real tags
                    covered |= {series.value, series.lower, series.upper}
            else:
                covered |= {tag for tag in lowmem for regex in chart.multiline.tag if re.search(regex, tag)}
            # every chart has data: nothing spiked, so the charts of spikes' values are left out
            assert any(re.search(regex, tag) for regex in chart.multiline.tag for tag in lowmem) or chart.HasField("margin")
    assert covered == lowmem  # every lowmem scalar is on some chart
    charts = {chart.title for category in layout.category for chart in category.chart}
    assert "loss at spikes" not in charts and "state MB by block kind" in charts


def test_layer_groups_and_quantile_names() -> None:
    assert layer_group("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_group("model.transformer.wte.weight") == "model.transformer.wte"
    assert layer_group("layers.10.mlp.0.weight") == "layers.10"
    assert layer_group("bias") == "bias"
    assert quantile_names((0.01, 0.5, 0.99, 0.999, 1.0)) == ["p01", "p50", "p99", "p99.9", "p100"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(every_n_steps=0), "every_n_steps must be an int >= 1, got 0"),
        (dict(max_samples=0), "max_samples must be an int >= 1, got 0"),
        (dict(quantiles=()), r"quantiles must be a non-empty sequence of numbers in \[0, 1\], got \(\)"),
        (dict(quantiles=(0.5, 1.5)), r"got \(0.5, 1.5\)"),
        (dict(quantiles=(float("nan"),)), r"got \(nan,\)"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerDiagnostics(**kwargs)
