"""Quantized and bf16 momentum of AdamMini under ``LowMemFSDPStrategy``: resharded checkpoints
(2 -> 1 -> 2 processes), conversion between ``exp_avg_dtype`` on load (sharded and full
checkpoints), and the Triton kernel on sharded parameters.

Three launches of ``_momentum_worker.py`` (2 processes, 1, then 2 again); the tests read what they
left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _launch import launch
from test_fsdp import max_diff, weights

WORKER = Path(__file__).with_name("_momentum_worker.py")
TIMEOUT = 240
FORMATS = ("full", "dcp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("momentum")
    for mode, nprocs in (("write", 2), ("single", 1), ("back", 2)):
        launch(WORKER, [mode, str(out)], nprocs=nprocs, timeout=TIMEOUT)
    facts = {mode: json.loads((out / f"{mode}.json").read_text()) for mode in ("write", "single", "back")}
    return out, facts


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reshard_two_to_one_to_two_processes_equals_the_uninterrupted_run(runs, fmt, dtype):
    out, _ = runs
    resumed = weights(out, f"resume_{fmt}_{dtype}_w2_w1_w2")
    diff, name = max_diff(resumed, weights(out, f"uninterrupted_{dtype}_w2"))
    assert diff < 1e-5, (name, diff)
    # the resumed run started from other weights (seed 11): equal only if the checkpoint was read
    assert max_diff(resumed, weights(out, "uninterrupted_fp32_w2"))[0] > 1e-4  # and int8/int4 steps are not fp32 ones


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_momentum_resumes_exactly_on_two_processes(runs, fmt):
    out, _ = runs
    diff, name = max_diff(weights(out, f"resume_{fmt}_bf16_w2"), weights(out, "uninterrupted_bf16_w2"))
    assert diff < 1e-6, (name, diff)


def test_triton_kernel_on_sharded_parameters_equals_the_reference_on_one_process(runs):
    out, _ = runs
    diff, name = max_diff(weights(out, "equal_int8_triton_w2"), weights(out, "equal_int8_torch_w1"))
    assert diff < 1e-5, (name, diff)


def test_bf16_momentum_on_two_processes_draws_the_random_bits_of_one_process(runs):
    """Stochastic rounding of the bf16 momentum draws its bits from each entry's place in the whole
    parameter (seed: its position in the param group; index: its global flat index), so FSDP2 shards
    round as the unsharded tensors of a plain one-process Trainer do."""
    out, _ = runs
    diff, name = max_diff(weights(out, "equal_bf16_w2"), weights(out, "equal_bf16_w1"))
    assert diff < 1e-6, (name, diff)
    assert max_diff(weights(out, "equal_bf16_w1"), weights(out, "equal_int8_torch_w1"))[0] > 0  # a bf16 run


@pytest.mark.parametrize(("saved", "resumed"), [("fp32", "int8"), ("int8", "fp32")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_of_another_exp_avg_dtype_is_converted_on_load(runs, fmt, saved, resumed):
    out, facts = runs
    converted = weights(out, f"convert_{fmt}_{saved}_to_{resumed}_w2")
    # the optimizer's own load_state_dict, in one process, converts the same way
    diff, name = max_diff(converted, weights(out, f"convert_plain_{saved}_to_{resumed}_w1"))
    assert diff < 1e-5, (name, diff)
    fact = facts["write"][f"convert_{fmt}_{saved}_to_{resumed}"]
    code = "torch.int8" if resumed == "int8" else "torch.float32"
    assert fact["dtypes"]["blocks.0.attn.q_proj.weight"] == code
    assert fact["dtypes"]["blocks.0.attn.q_proj.bias"] == "torch.float32"  # 1-D tensors keep fp32 momentum
    lines = [line for line in fact["logs"] if line.startswith("Converted the saved momentum")]
    assert len(lines) == 1, fact["logs"]
    assert (f"{saved} -> {resumed}" if saved == "fp32" else f"{saved} (block 4) -> {resumed}") in lines[0]
