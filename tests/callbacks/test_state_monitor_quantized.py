"""OptimizerStateMonitor's count of AdamMini/Eve state with bf16, int8 and int4 momentum."""

from __future__ import annotations

import pytest
import torch
from _cb_helpers import TinyGPT

from lightning_lowmem.callbacks import measure_state_memory
from lightning_lowmem.optim import AdamMini, Eve
from lightning_lowmem.utils import optimizer_state_bytes


@pytest.mark.parametrize(("optimizer_class", "name", "per_param"), [
    (AdamMini, "int8", 1.0), (Eve, "int4", 0.5), (AdamMini, "bf16", 2.0),
])
def test_codes_and_scales_are_counted_per_kind(optimizer_class, name, per_param):
    torch.manual_seed(0)
    module = TinyGPT("adam_mini")
    optimizer = optimizer_class(module, exp_avg_dtype=name, exp_avg_block=16)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    memory = measure_state_memory(optimizer)
    codes = sum(s["exp_avg"].numel() * s["exp_avg"].element_size() for s in optimizer.state.values())
    scales = sum(s["exp_avg_scale"].numel() * 4 for s in optimizer.state.values() if "exp_avg_scale" in s)
    v_and_steps = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg_sq", "step"))
    assert memory.total_bytes == optimizer_state_bytes(optimizer) == codes + scales + v_and_steps
    assert sum(memory.total_bytes_by_kind.values()) == memory.total_bytes
    if name != "bf16":
        assert scales > 0
    # the model is tiny: its 1-D tensors (fp32 m), scales and v weigh more than on a real model
    assert per_param < memory.bytes_per_param < per_param + 1.6
