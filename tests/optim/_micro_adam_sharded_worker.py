"""Run MicroAdam on an FSDP2-sharded model in 2 gloo processes and compare with one process.

Run as ``python _micro_adam_sharded_worker.py OUT_JSON``; rank 0 writes the results to OUT_JSON.

Small ``block_size`` (16) and ``quant_bucket`` (8) so that rows hold several blocks and buckets,
with shorter last ones, on tensors small enough for a quick test:

=============  ===========  =================  ==================================================
parameter      shape        rows on 2 ranks    per row
=============  ===========  =================  ==================================================
inp.weight     [37, 6]      19 | 18            1 block of 6, 1 bucket of 6
wide.weight    [8, 37]      4 | 4              3 blocks (13, 13, 11), 5 buckets (last of 5), odd
mix            [5, 3, 7]    3 | 2              rows of 21: 2 blocks (11, 10), 3 buckets (last of 5)
head.weight    [3, 8]       2 | 1              1 block of 8, 1 bucket
out.weight     [1, 3]       1 | 0              an empty shard on rank 1
biases, norm   1-D          split elementwise  AdamW state
=============  ===========  =================  ==================================================
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

from _gloo import collectives_in, finish, init, spawn
from lightning_lowmem.optim import MicroAdam

WORLD = 2
STEPS = 5
MORE_STEPS = 2  # after a round trip through a full (gathered) optimizer state dict
BATCH = 8
SETTINGS = dict(lr=1e-2, weight_decay=0.1, window=3, density=0.2, block_size=16, quant_bucket=8,
                min_compressed_numel=3, backend="torch")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 37)
        self.wide = nn.Linear(37, 8)
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 1)
        self.mix = nn.Parameter(torch.randn(5, 3, 7) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.head(torch.tanh(self.wide(torch.tanh(self.inp(x))))))
        return self.out(h), torch.tanh(x[:, :5] @ self.mix.reshape(5, 21))


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(steps, BATCH, 6, generator=gen), torch.randn(steps, BATCH, 1, generator=gen),
            torch.randn(steps, BATCH, 21, generator=gen))


def train(model: nn.Module, opt: MicroAdam, rank: int, world: int, steps: range) -> None:
    """Each rank takes its slice of the global batch; FSDP2 averages the gradients."""
    xs, ys, zs = data(STEPS + MORE_STEPS)
    per_rank = BATCH // world
    for t in steps:
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        out, aux = model(xs[t, part])
        (nn.functional.mse_loss(out, ys[t, part]) + nn.functional.mse_loss(aux, zs[t, part])).backward()
        opt.step()


def collectives_in_step(opt: MicroAdam, model: nn.Module) -> int:
    xs, ys, zs = data(1)
    opt.zero_grad()
    out, aux = model(xs[0, :4])
    (nn.functional.mse_loss(out, ys[0, :4]) + nn.functional.mse_loss(aux, zs[0, :4])).backward()
    return collectives_in(opt.step)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def fraction_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean()) if a.numel() else 1.0


def worker(rank: int, out: str, init_file: str) -> None:
    init(rank, init_file, WORLD)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict = {}

    torch.manual_seed(0)
    reference, sharded = Net(), Net()
    sharded.load_state_dict(reference.state_dict())
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    ref_opt = MicroAdam(reference, **SETTINGS)
    train(reference, ref_opt, rank=0, world=1, steps=range(STEPS))
    fully_shard(sharded, mesh=mesh)
    opt = MicroAdam(sharded, **SETTINGS)
    train(sharded, opt, rank=rank, world=WORLD, steps=range(STEPS))

    ref_params = dict(reference.named_parameters())
    results["compressed"] = opt.compressed_names()
    results["local_rows"] = {n: p.to_local().shape[0] for n, p in sharded.named_parameters()}
    results["max_diff"] = {n: (full(p) - ref_params[n].detach()).abs().max().item() for n, p in sharded.named_parameters()}
    results["moved"] = {n: (full(p) - initial[n]).abs().max().item() for n, p in sharded.named_parameters()}
    state = {}
    for name, p in sharded.named_parameters():
        ref_state = ref_opt.state[ref_params[name]]
        state[name] = {
            key: {
                "dtensor": isinstance(value, DTensor),
                "placements": [str(pl) for pl in value.placements] if isinstance(value, DTensor) else None,
                "shape": list(value.shape),
                "single_shape": list(ref_state[key].shape),
                "dtype": str(value.dtype),
                "single_dtype": str(ref_state[key].dtype),
                "equal_fraction": fraction_equal(full(value), ref_state[key]),
            }
            for key, value in opt.state[p].items()
        }
    results["state"] = state

    # a full (gathered) optimizer state dict: every state tensor is gathered, so every dtype must be
    # one gloo/NCCL can all-gather; it equals the single process's state, and loading it into a fresh
    # sharded optimizer continues like the single process does
    options = StateDictOptions(full_state_dict=True)
    gathered = get_optimizer_state_dict(sharded, opt, options=options)
    single = get_optimizer_state_dict(reference, ref_opt, options=options)
    results["full_state_dict"] = {
        name: {key: [str(v.dtype), list(v.shape), fraction_equal(v, single["state"][name][key])]
               for key, v in entries.items()}
        for name, entries in gathered["state"].items()
    }
    resumed = Net()
    resumed.load_state_dict({n: full(p.detach()) for n, p in sharded.named_parameters()})
    fully_shard(resumed, mesh=mesh)
    resumed_opt = MicroAdam(resumed, **SETTINGS)
    set_optimizer_state_dict(resumed, resumed_opt, gathered, options=options)
    results["resumed_state_types"] = sorted({
        f"{type(v).__name__}:{v.dtype}" for s in resumed_opt.state.values() for k, v in s.items() if k != "step"
    })
    train(resumed, resumed_opt, rank=rank, world=WORLD, steps=range(STEPS, STEPS + MORE_STEPS))
    train(reference, ref_opt, rank=0, world=1, steps=range(STEPS, STEPS + MORE_STEPS))
    results["resumed_max_diff"] = {
        n: (full(p) - ref_params[n].detach()).abs().max().item() for n, p in resumed.named_parameters()
    }

    results["collectives_per_step"] = collectives_in_step(opt, sharded)

    column_sharded = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    try:
        MicroAdam([column_sharded], min_compressed_numel=1)
    except ValueError as err:
        results["column_sharded_error"] = str(err)
    else:
        results["column_sharded_error"] = None

    finish(rank, out, results)


if __name__ == "__main__":
    spawn(worker, sys.argv[1], WORLD)
