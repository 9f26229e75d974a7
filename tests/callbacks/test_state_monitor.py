"""OptimizerStateMonitor: bytes counted from the real state, split by kind, logged and read back from TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from _cb_helpers import Events, TinyGPT, loader, trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lowmem.callbacks import OptimizerStateMonitor, measure_state_memory
from lightning_lowmem.callbacks.core.state_memory import peak_memory_bytes
from lightning_lowmem.optim.registry import plan_of
from lightning_lowmem.utils import optimizer_state_bytes

OPTIMIZERS = ["adamw", "adam_mini", "eve", "micro_adam", "sgd"]


def stepped_optimizer(name: str) -> tuple[TinyGPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = TinyGPT(name)
    optimizer = module._optimizer()
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return module, optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_totals_match_the_state_tensors(name: str) -> None:
    module, optimizer = stepped_optimizer(name)
    memory = measure_state_memory(optimizer)
    assert memory.total_bytes == optimizer_state_bytes(optimizer) == memory.rank_bytes[0]
    assert sum(memory.total_bytes_by_kind.values()) == memory.total_bytes
    assert memory.num_params == sum(p.numel() for p in module.parameters()) == sum(memory.params_by_kind.values())
    assert memory.adamw_bytes == 8 * memory.num_params
    assert memory.saving_percent == pytest.approx(100 * (1 - memory.total_bytes / memory.adamw_bytes))


def test_adamw_is_eight_bytes_per_parameter_plus_its_step_counters() -> None:
    module, optimizer = stepped_optimizer("adamw")
    memory = measure_state_memory(optimizer)
    tensors = len(list(module.parameters()))
    assert memory.kinds == ("full",)
    assert memory.total_bytes == 8 * memory.num_params + 4 * tensors  # exp_avg + exp_avg_sq + a 0-dim fp32 step
    assert memory.saving_bytes == -4 * tensors


@pytest.mark.parametrize("name", ["adam_mini", "eve"])
def test_block_kinds_follow_the_plan(name: str) -> None:
    module, optimizer = stepped_optimizer(name)
    memory = measure_state_memory(optimizer)
    plan = plan_of(optimizer)
    by_kind = plan.rows_by_kind()  # kind -> (blocks, params, v entries), fused projections by segment
    assert memory.kinds == tuple(by_kind)  # the plan's kinds: no "mixed"
    assert memory.params_by_kind == {kind: params for kind, (_, params, _) in by_kind.items()}
    for kind, (_, params, entries) in by_kind.items():
        # exp_avg (4 bytes/param) and v (4 bytes/block), plus each tensor's 4-byte step, split over its segments
        tensors = sum(any(spec.kind == kind for spec, _ in entry.segments) for entry in plan.values())
        assert 0 < memory.total_bytes_by_kind[kind] - 4 * (params + entries) <= 4 * tensors, kind
    assert memory.bytes_per_param < 4.5


def test_micro_adam_kinds() -> None:
    _, optimizer = stepped_optimizer("micro_adam")
    memory = measure_state_memory(optimizer)
    assert memory.kinds == ("full", "compressed")
    assert memory.params_by_kind["compressed"] == sum(
        p.numel() for g in optimizer.param_groups for p in g["params"] if optimizer.is_compressed(p, g)
    )
    compressed = [p for g in optimizer.param_groups for p in g["params"] if optimizer.is_compressed(p, g)]
    assert memory.total_bytes_by_kind["compressed"] == sum(
        v.numel() * v.element_size() for p in compressed for v in optimizer.state[p].values() if torch.is_tensor(v)
    )
    assert memory.total_bytes_by_kind["compressed"] / memory.params_by_kind["compressed"] < 4


def test_logged_values_read_back_from_tensorboard(tmp_path: Path) -> None:
    monitor = OptimizerStateMonitor(every_n_steps=5)
    L.seed_everything(0)
    t = trainer(tmp_path, [monitor], max_steps=12)
    t.fit(TinyGPT("adam_mini"), loader())
    memory = measure_state_memory(t.optimizers[0])
    events = Events(tmp_path / "run" / "version_0")

    total = events.scalars("lowmem/state/total_mb")
    assert sorted(total) == [1, 5, 10, 12]  # after the first step, every 5, and after the last
    assert list(total.values()) == pytest.approx([memory.total_bytes / 1e6] * 4, rel=1e-6)
    assert "lowmem/state/rank_mb" not in events.tags()  # one rank: the same as the total, not charted
    by_kind = events.series("lowmem/state/mb_by_kind")
    assert set(by_kind) == set(memory.kinds) == {"full", "row", "head", "tensor"}
    for kind in memory.kinds:
        assert by_kind[kind][12] == pytest.approx(memory.total_bytes_by_kind[kind] / 1e6, rel=1e-6)
    assert events.scalars("lowmem/state/bytes_per_param")[12] == pytest.approx(memory.bytes_per_param, rel=1e-6)
    assert events.scalars("lowmem/state/saving_percent")[12] == pytest.approx(memory.saving_percent, rel=1e-6)
    peak = events.scalars("lowmem/state/peak_memory_mb")
    assert 10 < peak[1] <= peak[12] <= peak_memory_bytes(torch.device("cpu")) / 1e6 * (1 + 1e-6)  # RSS in MB (fp32 in the file)

    (step, text), = events.texts("lowmem/state/plan/text_summary").items()
    assert step == 1
    assert "**AdamMini state layout**" in text and "Block plan (adam_mini)" in text
    assert f"{memory.total_bytes / 1e6:.3f}" in text and "fp32 AdamW" in text and "mixed" not in text
    assert monitor.state_dict() == {"plan_logged": True}


def test_scalars_reach_other_loggers_too(tmp_path: Path) -> None:
    L.seed_everything(0)
    t = trainer(tmp_path, [OptimizerStateMonitor(every_n_steps=2)], max_steps=4, logger=CSVLogger(tmp_path))
    with pytest.warns(UserWarning, match="write text to TensorBoard only; this Trainer's loggers are CSVLogger"):
        t.fit(TinyGPT("adamw"), loader())
    header = (Path(t.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "lowmem/state/total_mb" in header and "lowmem/state/mb_by_kind/full" in header


def test_needs_a_logger(tmp_path: Path) -> None:
    t = trainer(tmp_path, [OptimizerStateMonitor()], logger=False)
    with pytest.raises(MisconfigurationException, match="Cannot use `OptimizerStateMonitor` callback with `Trainer` that has no logger"):
        t.fit(TinyGPT(), loader())


@pytest.mark.parametrize("every_n_steps", [0, -3, 2.5, True])
def test_bad_interval(every_n_steps: object) -> None:
    with pytest.raises(ValueError, match=f"every_n_steps must be an int >= 1, got {every_n_steps!r}"):
        OptimizerStateMonitor(every_n_steps=every_n_steps)
