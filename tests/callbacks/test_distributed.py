"""The callbacks on 2 CPU processes under ``lowmem_fsdp`` (FSDP2 over gloo) and DDP: see ``_cb_dist_worker.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _cb_helpers import Events, TinyGPT
from _launch import launch

from lightning_lowmem.callbacks import measure_state_memory

WORKER = Path(__file__).with_name("_cb_dist_worker.py")
TIMEOUT = 120.0


def run_workers(out: Path, nprocs: int = 2) -> list[dict[str, Any]]:
    """Run the worker on ``nprocs`` processes (all killed on failure or timeout); each rank's facts."""
    launch(WORKER, [str(out)], nprocs, TIMEOUT)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("dist")
    return out, run_workers(out)


def test_a_spike_on_one_rank_is_skipped_on_both(facts: tuple[Path, list[dict[str, Any]]]) -> None:
    out, ranks = facts
    for rank in ranks:
        spike = rank["spike"]
        assert spike["sharded"] is True  # the parameters really were FSDP2 DTensors
        assert spike["identical"] is True  # weights and optimizer state untouched on this rank
        assert spike["count"] == 1
        (event,) = spike["events"]
        assert event["step"] == 30 and event["action"] == "skip" and "loss z=" in event["reason"]
    assert ranks[0]["spike"]["events"] == ranks[1]["spike"]["events"]
    assert ranks[0]["spike"]["shadow_l2"] == ranks[1]["spike"]["shadow_l2"] > 0
    # rank 0 wrote the event
    assert Events(out / "tb" / "spike" / "version_0").scalars("lowmem/spikes/count")[30] == 1


def test_state_totals_count_shards_once_and_replicas_once(facts: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = facts
    torch.manual_seed(0)
    module = TinyGPT("adam_mini")
    optimizer = module._optimizer()
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    single = measure_state_memory(optimizer)  # the same optimizer on one process
    for rank in ranks:
        spike = rank["spike"]
        assert spike["total_bytes"] == single.total_bytes
        assert spike["total_bytes_by_kind"] == single.total_bytes_by_kind
        assert spike["num_params"] == single.num_params
        # each rank holds its half of the sharded state, plus the replicated block statistics and steps
        assert single.total_bytes / 2 < max(spike["rank_bytes"]) < 0.6 * single.total_bytes
        assert sum(spike["rank_bytes"]) > single.total_bytes


def test_sharded_trajectories(facts: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = facts
    for rank in ranks:
        assert rank["trajectory"]["adamw"] == 0.0  # AdamW against its own sharded recording
        assert rank["trajectory"]["adam_mini"] > 0.0
        assert rank["snapshot_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    assert ranks[0]["trajectory"] == ranks[1]["trajectory"]


def test_ddp(facts: tuple[Path, list[dict[str, Any]]]) -> None:
    """Plain replicated tensors: the same skip on both ranks, the state counted once, a replicated snapshot."""
    _, ranks = facts
    for rank in ranks:
        ddp = rank["ddp"]
        assert ddp["identical"] is True
        assert ddp["events"] == [{"step": 30, "action": "skip"}]
        assert ddp["rank_bytes"] == [ddp["total_bytes"]] * 2  # every rank holds the whole state
        assert ddp["total_bytes"] == ranks[0]["spike"]["total_bytes"]  # = the sharded run's logical total
        assert ddp["distance"] == 0.0
