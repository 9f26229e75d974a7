"""Train a tiny Mixtral with AdamMini/Eve sharded by FSDP2 over 2 gloo processes and in one process.

3 experts over 2 ranks: FSDP2 shards the banks on dim 0, 2 experts on rank 0 and 1 on rank 1.
Run as ``python _moe_fsdp_worker.py OUT_JSON``; rank 0 writes the results to OUT_JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))
from _gloo import collectives_in, finish, init, spawn  # noqa: E402

from lightning_lowmem import AdamMini, Eve  # noqa: E402

WORLD, STEPS, BATCH = 2, 3, 4


def model() -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=32)
    return MixtralForCausalLM(config)


def train(net: torch.nn.Module, make, rank: int, world: int):
    opt = make(net)
    tokens = torch.randint(0, 32, (STEPS, BATCH, 8), generator=torch.Generator().manual_seed(1))
    per_rank = BATCH // world
    for t in range(STEPS):
        x = tokens[t, rank * per_rank : (rank + 1) * per_rank]
        opt.zero_grad()
        net(input_ids=x, labels=x).loss.backward()
        opt.step()
    return opt


OPTIMIZERS = {
    "adam_mini": lambda m: AdamMini(m, lr=1e-2, backend="torch"),
    "adam_mini_paper": lambda m: AdamMini(m, lr=1e-2, preset="adam_mini_paper", backend="torch"),
    "eve": lambda m: Eve(m, lr=1e-2, backend="torch"),
    "adam_mini/native": lambda m: AdamMini(m, lr=1e-2, backend="native"),
    # bf16 momentum: each expert of a bank rounds with the bank's seed at its global flat indices
    "adam_mini/bf16": lambda m: AdamMini(m, lr=1e-2, backend="torch", exp_avg_dtype="bf16"),
}


def worker(rank: int, out: str, init_file: str) -> None:
    init(rank, init_file, WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for label, make in OPTIMIZERS.items():
        reference = model()
        train(reference, make, rank=0, world=1)
        sharded = model()
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        opt = train(sharded, make, rank, WORLD)
        bank = sharded.model.layers[0].mlp.experts.down_proj
        state = opt.state[bank]["exp_avg_sq"]
        results[label] = {
            "max_diff": max((p.full_tensor() - r.detach()).abs().max().item()
                            for p, r in zip(sharded.parameters(), reference.parameters())),
            "bank_local_experts": bank.to_local().shape[0],
            "bank_state": [type(state.placements[0]).__name__, list(state.shape), list(state.to_local().shape)],
            "all_dtensor": all(isinstance(v, DTensor) for s in opt.state.values() for k, v in s.items() if k != "step"),
        }
        opt.zero_grad()
        tokens = torch.randint(0, 32, (BATCH // WORLD, 8), generator=torch.Generator().manual_seed(2))
        sharded(input_ids=tokens, labels=tokens).loss.backward()
        results[label]["collectives_per_step"] = collectives_in(opt.step)
    finish(rank, out, results)


if __name__ == "__main__":
    spawn(worker, sys.argv[1], WORLD)
