"""lr_multiplier (the formula) and build_scheduler (a LambdaLR that follows it, resumable)."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from torch import nn

from lightning_lowmem.config import SchedulerConfig
from lightning_lowmem.optim.schedulers import build_scheduler, lr_multiplier

COSINE = SchedulerConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
LINEAR = SchedulerConfig(name="linear", warmup_steps=4, min_lr_ratio=0.1)


@pytest.mark.parametrize(
    ("cfg", "step", "expected"),
    [
        (COSINE, 0, 0.0),  # warmup starts from 0
        (COSINE, 1, 0.25),
        (COSINE, 3, 0.75),
        (COSINE, 4, 1.0),  # warmup ends at the peak
        (COSINE, 9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 20))),
        (COSINE, 14, 0.55),  # half way: the mean of peak and floor
        (COSINE, 24, 0.1),  # total_steps: the floor
        (COSINE, 1000, 0.1),  # constant after
        (LINEAR, 2, 0.5),
        (LINEAR, 9, 0.1 + 0.9 * 0.75),
        (LINEAR, 14, 0.55),
        (LINEAR, 24, 0.1),
        (LINEAR, 30, 0.1),
        (SchedulerConfig("none", warmup_steps=4), 0, 1.0),  # "none" ignores warmup
        (SchedulerConfig("cosine"), 0, 1.0),  # no warmup: the peak at step 0
        (SchedulerConfig("cosine", warmup_steps=24), 24, 0.0),  # warmup == total: straight to the floor
    ],
)
def test_lr_multiplier_values(cfg, step, expected):
    assert lr_multiplier(step, cfg, total_steps=24) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("cfg", [COSINE, LINEAR])
def test_lr_multiplier_rises_then_falls_to_the_floor(cfg):
    values = [lr_multiplier(s, cfg, total_steps=24) for s in range(40)]
    assert all(a < b for a, b in zip(values[:4], values[1:5]))  # warmup strictly increases
    assert all(a >= b for a, b in zip(values[4:], values[5:]))  # decay never increases
    assert max(values) == 1.0 and min(values[4:]) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("step", "cfg", "total_steps", "message"),
    [
        (-1, COSINE, 24, "Invalid step: -1 (must be >= 0)."),
        (0, COSINE, 0, "Invalid total_steps: 0 (must be an integer >= 1); set scheduler.total_steps"),
        (0, COSINE, math.inf, "Invalid total_steps: inf (must be an integer >= 1)"),
        (0, COSINE, 3, "Invalid warmup_steps: 4 (must be <= total_steps = 3)"),
    ],
)
def test_lr_multiplier_errors(step, cfg, total_steps, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lr_multiplier(step, cfg, total_steps)


def _optimizer() -> torch.optim.Optimizer:
    a, b = nn.Linear(2, 2), nn.Linear(2, 1)
    return torch.optim.SGD([{"params": a.parameters(), "lr": 0.5}, {"params": b.parameters(), "lr": 0.1}])


def test_build_scheduler_follows_lr_multiplier_in_every_group():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, COSINE, total_steps=24)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    for step in range(30):
        factor = lr_multiplier(step, COSINE, 24)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * factor, 0.1 * factor], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_build_scheduler_none_and_dict_config():
    assert build_scheduler(_optimizer(), SchedulerConfig(), total_steps=10) is None
    optimizer = _optimizer()
    build_scheduler(optimizer, {"name": "linear", "warmup_steps": 2}, total_steps=10)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_build_scheduler_rejects_a_warmup_longer_than_the_run():
    with pytest.raises(ValueError, match=re.escape("Invalid warmup_steps: 4 (must be <= total_steps = 2)")):
        build_scheduler(_optimizer(), COSINE, total_steps=2)


def test_scheduler_state_dict_resumes_the_schedule():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, LINEAR, total_steps=24)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)

    resumed_optimizer = _optimizer()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = build_scheduler(resumed_optimizer, LINEAR, total_steps=24)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # plain data: loads with weights_only
    for _ in range(5):
        resumed_optimizer.step()
        resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_multiplier(12, LINEAR, 24))
