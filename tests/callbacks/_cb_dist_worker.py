"""Two-process runs of the callbacks under ``lowmem_fsdp`` (FSDP2, gloo) and DDP, for ``test_distributed.py``.

Run as ``python _cb_dist_worker.py OUT`` in each of 2 processes started with ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (Lightning then treats them as launched
externally). Each rank writes its findings to ``OUT/rank<r>.json``; rank 0 writes the TensorBoard
logs under ``OUT/tb``. Each rank reads every other sample (no DistributedSampler, which shuffles).
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the launcher's helpers
from _launch import end_worker  # noqa: E402
from _cb_helpers import TinyGPT, UpdateProbe, markov_tokens, trainer  # noqa: E402

from lightning_lowmem.callbacks import (  # noqa: E402
    LossSpikeMonitor,
    OptimizerDiagnostics,
    OptimizerStateMonitor,
    TrajectoryDistance,
)
from lightning_lowmem.strategies import LowMemFSDPStrategy  # noqa: E402

SPIKE_BATCH = 30


def rank_loader(rank: int) -> DataLoader:
    data = markov_tokens(256)
    return DataLoader(Subset(data, list(range(rank, len(data), 2))), batch_size=4, shuffle=False)


def fit(out: Path, name: str, module: L.LightningModule, callbacks: list, max_steps: int, ddp: bool = False) -> L.Trainer:
    if ddp:
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    else:
        strategy = LowMemFSDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    t = trainer(out / "tb", callbacks, name=name, devices=2, strategy=strategy, max_steps=max_steps,
                use_distributed_sampler=False, deterministic=False)
    L.seed_everything(0)
    t.fit(module, rank_loader(t.global_rank))
    return t


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    facts: dict[str, Any] = {}

    # 1. A spike in rank 1's batch only: both ranks skip the update. Every callback runs (no deadlock).
    probe = UpdateProbe(SPIKE_BATCH)
    spikes = LossSpikeMonitor(action="skip", warmup=20)
    state = OptimizerStateMonitor(every_n_steps=5)
    shadow = TrajectoryDistance("shadow", every_n_steps=5)
    L.seed_everything(0)
    module = TinyGPT("adam_mini", spike_batches=(SPIKE_BATCH,), spike_rank=1)
    t = fit(out, "spike", module, [probe, spikes, state, OptimizerDiagnostics(every_n_steps=5), shadow], max_steps=SPIKE_BATCH + 4)
    memory = state.last
    facts["spike"] = dict(
        rank=t.global_rank,
        sharded=probe.sharded,
        identical=probe.identical,
        count=spikes.count,
        events=[{k: e[k] for k in ("step", "action", "reason")} for e in spikes.events],
        total_bytes=memory.total_bytes,
        total_bytes_by_kind=memory.total_bytes_by_kind,
        rank_bytes=list(memory.rank_bytes),
        num_params=memory.num_params,
        shadow_l2=shadow.last.l2,
    )

    # 2. Trajectories: AdamW recorded with sharded snapshots, compared against itself and against AdamMini.
    snapshots = out / "snapshots"
    L.seed_everything(0)
    fit(out, "record", TinyGPT("adamw"), [TrajectoryDistance("record", snapshots, every_n_steps=4)], max_steps=8)
    distances = {}
    for optimizer in ("adamw", "adam_mini"):
        compare = TrajectoryDistance("compare", snapshots, every_n_steps=4)
        L.seed_everything(0)
        fit(out, f"compare_{optimizer}", TinyGPT(optimizer), [compare], max_steps=8)
        distances[optimizer] = compare.last.l2
    facts["trajectory"] = distances
    facts["snapshot_files"] = sorted(p.name for p in (snapshots / "step_00000008").iterdir())

    # 3. DDP: plain replicated tensors (no DTensor), the same decisions; snapshots of replicated weights.
    probe = UpdateProbe(SPIKE_BATCH)
    spikes = LossSpikeMonitor(action="skip", warmup=20)
    state = OptimizerStateMonitor(every_n_steps=5)
    L.seed_everything(0)
    module = TinyGPT("adam_mini", spike_batches=(SPIKE_BATCH,), spike_rank=1)
    fit(out, "ddp_spike", module, [probe, spikes, state, OptimizerDiagnostics(every_n_steps=5)], max_steps=SPIKE_BATCH + 2, ddp=True)
    snapshots = out / "ddp_snapshots"
    L.seed_everything(0)
    fit(out, "ddp_record", TinyGPT("adamw"), [TrajectoryDistance("record", snapshots, every_n_steps=4)], max_steps=4, ddp=True)
    compare = TrajectoryDistance("compare", snapshots, every_n_steps=4)
    L.seed_everything(0)
    fit(out, "ddp_compare", TinyGPT("adamw"), [compare], max_steps=4, ddp=True)
    facts["ddp"] = dict(
        identical=probe.identical,
        events=[{k: e[k] for k in ("step", "action")} for e in spikes.events],
        total_bytes=state.last.total_bytes,
        rank_bytes=list(state.last.rank_bytes),
        distance=compare.last.l2,
    )

    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        end_worker(1)  # do not wait on a peer that may be stuck in a collective
    end_worker(0)  # a barrier, then no teardown of gloo to race with the peer's (see tests/_launch.py)
