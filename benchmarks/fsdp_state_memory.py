"""Optimizer state per rank under FSDP2: 1 process against 2 (each rank should hold half).

Shards a GPT the way ``LowMemFSDPStrategy`` does (each block of ``transformer.h``, then the root;
:func:`lightning_lowmem.strategies.auto_shard`) over 1 and over 2 gloo CPU processes, runs a few
real forward/backward/optimizer steps on random tokens, and reports the largest optimizer state
each rank held after any step, counted from its local ``DTensor`` shards
(:func:`lightning_lowmem.utils.optimizer_state_bytes`). A ``row`` statistic is sharded like its
weight; ``head``/``tensor`` statistics are replicated (a few values per block), so 2 ranks hold a
little more than half of the 1-rank state.

    python benchmarks/fsdp_state_memory.py                 # GPT-2 small (124M): ~4 minutes on 2 cores
    python benchmarks/fsdp_state_memory.py --model tiny    # 0.8M parameters: ~40 s (process start-up)
    python benchmarks/fsdp_state_memory.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.optim import AdamMini, Eve
from lightning_lowmem.strategies import auto_shard, find_blocks
from lightning_lowmem.utils import optimizer_param_count, optimizer_state_bytes

OPTIMIZERS = {
    "AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
    "AdamMini (adam_mini)": lambda model: AdamMini(model, lr=1e-4, preset="adam_mini", backend="torch"),
    "AdamMini (adam_mini_paper)": lambda model: AdamMini(model, lr=1e-4, preset="adam_mini_paper", backend="torch"),
    "Eve": lambda model: Eve(model, lr=1e-4, backend="torch"),
}
MODELS = {"small": lambda: GPTConfig.gpt2_small(block_size=64), "tiny": lambda: GPTConfig.tiny(block_size=64)}
STEPS, BATCH = 2, 2


def run_rank(rank: int, world: int, port: int, model_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = GPT(MODELS[model_name]())
        auto_shard(model, mesh, blocks=find_blocks(model), forward_methods=())
        optimizer = make(model)
        peak = 0
        gen = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            idx = torch.randint(0, model.config.vocab_size, (BATCH, model.config.block_size + 1), generator=gen)
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peak = max(peak, optimizer_state_bytes(optimizer))
        rows[name] = {"params": optimizer_param_count(optimizer), "state_bytes": peak}
        del model, optimizer
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_name: str) -> list[dict[str, object]]:
    """One row per optimizer and world size (1, 2): per-rank parameters and peak state bytes."""
    results = []
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(run_rank, args=(world, free_port(), model_name, out), nprocs=world, join=True)
        per_rank = {(w, r): json.loads(Path(out, f"{w}-{r}.json").read_text()) for w in (1, 2) for r in range(w)}
    for name in OPTIMIZERS:
        single = per_rank[(1, 0)][name]["state_bytes"]
        for world in (1, 2):
            ranks = [per_rank[(world, r)][name] for r in range(world)]
            peak = max(r["state_bytes"] for r in ranks)
            results.append({
                "optimizer": name,
                "processes": world,
                "params_per_rank": max(r["params"] for r in ranks),
                "state_bytes_per_rank": peak,
                "bytes_per_param": peak / max(r["params"] for r in ranks),
                "vs_1_process": peak / single,
            })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = measure(args.model)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"Optimizer state per rank, GPT {args.model}, FSDP2 over gloo CPU processes (peak over {STEPS} steps)")
    header = f"{'optimizer':28} {'procs':>5} {'params/rank':>13} {'state MB/rank':>14} {'bytes/param':>12} {'vs 1 proc':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['optimizer']:28} {r['processes']:>5} {r['params_per_rank']:>13,} "
              f"{r['state_bytes_per_rank'] / 1e6:>14.2f} {r['bytes_per_param']:>12.3f} {r['vs_1_process']:>10.3f}")


if __name__ == "__main__":
    main()
