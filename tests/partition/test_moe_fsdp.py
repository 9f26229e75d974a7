"""A tiny Mixtral sharded by FSDP2 over 2 gloo processes trains exactly like one process.

Expert banks are sharded on dim 0 (whole experts per rank, 3 experts over 2 ranks): their block
state stays with the experts (``Shard(0)``, ``[E, blocks per expert]``) and adds no collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the model is transformers' Mixtral")

WORKER = Path(__file__).with_name("_moe_fsdp_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_fsdp") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("label", ["adam_mini", "adam_mini_paper", "eve", "adam_mini/native", "adam_mini/bf16"])
def test_sharded_moe_equals_one_process(results, label) -> None:
    run = results[label]
    assert run["max_diff"] < 2e-5, run
    assert run["all_dtensor"]
    assert run["bank_local_experts"] == 2  # rank 0 of torch.chunk(3 experts, 2)


def test_bank_state_stays_with_its_experts(results) -> None:
    # down_proj [3, 16, 24]: adam_mini one value per output row of each expert, the paper one per expert
    assert results["adam_mini"]["bank_state"] == ["Shard", [3, 16], [2, 16]]
    assert results["adam_mini_paper"]["bank_state"] == ["Shard", [3, 1], [2, 1]]
    assert results["eve"]["bank_state"] == ["Shard", [3, 16], [2, 16]]


@pytest.mark.parametrize("label", ["adam_mini", "adam_mini_paper", "eve"])
def test_at_most_one_collective_per_step(results, label) -> None:
    assert results[label]["collectives_per_step"] <= 1
