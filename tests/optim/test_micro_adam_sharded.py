"""MicroAdam on FSDP2 DTensors (2 gloo processes) equals one process, with Shard(0) state and no collective.

The worker (``_micro_adam_sharded_worker.py``, see its table of shapes) trains a sharded and an
unsharded copy side by side with a small block size (16) and bucket (8), so rows hold several
blocks and buckets and some shards split rows unevenly (3 rows: 2 | 1; 1 row: 1 | 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_micro_adam_sharded_worker.py")
COMPRESSED = {"mix", "inp.weight", "wide.weight", "head.weight", "out.weight"}
DENSE = {"inp.bias", "wide.bias", "head.bias", "norm.weight", "norm.bias", "out.bias"}
COMPRESSED_DTYPES = {"window": "torch.int32", "error": "torch.uint8", "error_min": "torch.bfloat16", "error_max": "torch.bfloat16"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro_adam_sharded") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_sharded_run_equals_single_process(results):
    assert set(results["compressed"]) == COMPRESSED
    assert results["local_rows"]["head.weight"] == 2 and results["local_rows"]["out.weight"] == 1  # rank 0's rows
    for name, diff in results["max_diff"].items():
        assert diff < 1e-6, (name, diff)
        assert results["moved"][name] > 1e-2, name  # 5 steps moved every parameter: not a trivial comparison


def test_every_state_tensor_is_a_shard0_dtensor_with_the_single_process_shape(results):
    for name, state in results["state"].items():
        keys = set(COMPRESSED_DTYPES) if name in COMPRESSED else {"exp_avg", "exp_avg_sq"}
        assert set(state) == {"step", *keys}, name
        assert not state["step"]["dtensor"] and state["step"]["shape"] == []  # a replicated scalar
        for key in keys:
            entry = state[key]
            assert entry["dtensor"] and entry["placements"] == ["S(0)"], (name, key)
            assert entry["shape"] == entry["single_shape"], (name, key)
            assert entry["dtype"] == entry["single_dtype"], (name, key)
    wide = results["state"]["wide.weight"]
    assert wide["window"]["shape"] == [8, 3, 9]  # 8 rows, window 3, 3 + 3 + 3 kept of blocks 13, 13, 11
    assert wide["error"]["shape"] == [8, 19] and wide["error_min"]["shape"] == [8, 5]  # 37 codes, 5 buckets


def test_compressed_state_equals_the_single_process_state(results):
    """The rows' computation does not depend on which rank holds them: the same selections, codes and
    min/max as one process (exactly, unless a gradient rounding flips a knife-edge choice)."""
    for name in COMPRESSED:
        for key in COMPRESSED_DTYPES:
            assert results["state"][name][key]["equal_fraction"] >= 0.98, (name, key)


def test_full_state_dict_gathers_every_dtype_and_resumes(results):
    """get_optimizer_state_dict(full_state_dict=True) all-gathers every state tensor (gloo cannot
    all-gather int16); it equals the single process's state, and a fresh sharded optimizer loaded
    from it continues 2 steps like the single process."""
    gathered = results["full_state_dict"]
    assert set(gathered) == COMPRESSED | DENSE
    for name in COMPRESSED:
        for key, dtype in COMPRESSED_DTYPES.items():
            got_dtype, shape, equal = gathered[name][key]
            assert got_dtype == dtype and shape == results["state"][name][key]["single_shape"], (name, key)
            assert equal >= 0.98, (name, key)
    assert results["resumed_state_types"] == ["DTensor:torch.bfloat16", "DTensor:torch.float32",
                                              "DTensor:torch.int32", "DTensor:torch.uint8"]
    for name, diff in results["resumed_max_diff"].items():
        assert diff < 1e-6, (name, diff)


def test_step_runs_no_collective(results):
    assert results["collectives_per_step"] == 0


def test_parameters_sharded_on_another_dim_are_refused(results):
    message = results["column_sharded_error"]
    assert message is not None and "Shard(dim=1)" in message and "dim 0" in message
