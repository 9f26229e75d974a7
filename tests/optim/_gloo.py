"""Shared plumbing of the 2-process gloo scripts of the sharded-optimizer tests.

The scripts run as ``python <script> OUT_JSON``; rank 0 writes the results there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the launcher's helpers
from _launch import end_worker  # noqa: E402


def spawn(worker: Callable[[int, str, str], None], out_path: str, world: int) -> None:
    """Run ``worker(rank, out_path, init_file)`` in ``world`` processes that rendezvous through a file."""
    init = out_path + ".init"
    if os.path.exists(init):
        os.remove(init)
    mp.spawn(worker, args=(out_path, init), nprocs=world, join=True)


def init(rank: int, init_file: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def collectives_in(step: Callable[[], Any]) -> int:
    """Collective calls made by ``step()``: one ``c10d::`` event each (gloo's work has its own event)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def finish(rank: int, out: str, results: dict[str, Any]) -> None:
    """Rank 0 writes ``results``; every rank then ends its process (see ``tests/_launch.py``'s ``end_worker``)."""
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    end_worker(0)
