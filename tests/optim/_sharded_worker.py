"""Run BlockAdam on an FSDP2-sharded model in 2 gloo processes and compare with one process.

Run as ``python _sharded_worker.py OUT_JSON``; writes the results to OUT_JSON (rank 0).
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

from _gloo import collectives_in, finish, init, spawn
import lightning_lowmem.kernels.block_adam_native as native_rows
from lightning_lowmem.optim import BlockAdam
from lightning_lowmem.partition import BlockPlan, BlockSpec, ParamBlocks

WORLD = 2
STEPS = 5


class Conv1D(nn.Module):
    """GPT-2 style transposed linear: weight [in, out]."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 9)  # 3 heads of 3 rows: rows 0-4 | 5-8, head 1 straddles
        self.qkv = nn.Linear(9, 15, bias=False)  # Q 6 rows (2 heads of 3), K 3 rows, V 6 rows
        self.fc = nn.Linear(15, 3)  # 3 rows split 2 | 1
        self.conv = Conv1D(3, 5)  # rows are dim 1: every rank holds every row, half the columns
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(torch.tanh(self.fc(torch.tanh(self.qkv(torch.tanh(self.q_proj(x))))))))


def plan_for(model: nn.Module, paper: bool) -> BlockPlan:
    head = BlockSpec("head", head_dim=3)
    v_spec = BlockSpec("tensor") if paper else BlockSpec("row")
    entries = [
        ParamBlocks.single("q_proj.weight", (9, 6), head),
        ParamBlocks.single("q_proj.bias", (9,), BlockSpec("full")),
        ParamBlocks("qkv.weight", (15, 9), ((head, 6), (head, 3), (v_spec, 6))),
        ParamBlocks.single("fc.weight", (3, 15), BlockSpec("tensor") if paper else BlockSpec("row")),
        ParamBlocks.single("fc.bias", (3,), BlockSpec("full")),
        ParamBlocks.single("conv.weight", (3, 5), BlockSpec("row"), transposed=True),
        ParamBlocks.single("norm.weight", (5,), BlockSpec("tensor")),
        ParamBlocks.single("norm.bias", (5,), BlockSpec("full")),
    ]
    return BlockPlan(entries, preset="test")


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, 8, 6, generator=gen), torch.randn(STEPS, 8, 5, generator=gen)


def train(model: nn.Module, paper: bool, rank: int, world: int, backend: str = "torch") -> BlockAdam:
    opt = BlockAdam(model, lr=1e-2, weight_decay=0.1, plan=plan_for(model, paper), backend=backend)
    xs, ys = data()
    per_rank = xs.shape[1] // world
    for t in range(STEPS):
        x = xs[t, rank * per_rank : (rank + 1) * per_rank]
        y = ys[t, rank * per_rank : (rank + 1) * per_rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return opt


def count_collectives(opt: BlockAdam, model: nn.Module) -> int:
    xs, ys = data()
    opt.zero_grad()
    nn.functional.mse_loss(model(xs[0, :4]), ys[0, :4]).backward()
    return collectives_in(opt.step)


KERNEL_TENSORS = []  # per call of the C kernel, the number of tensors (or segments) it was given


def _counting(kernel):
    def run(params, *args, **kwargs):
        KERNEL_TENSORS.append(len(params))
        return kernel(params, *args, **kwargs)
    return run


def worker(rank: int, out: str, init_file: str) -> None:
    native_rows.block_adam_rows_ = _counting(native_rows.block_adam_rows_)
    init(rank, init_file, WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    # the sharded run takes each backend; the reference is always the eager one, in one process
    for paper, backend in ((False, "torch"), (True, "torch"), (False, "native"), (True, "native")):
        torch.manual_seed(0)
        reference = Net()
        sharded = Net()
        sharded.load_state_dict(reference.state_dict())
        train(reference, paper, rank=0, world=1)
        fully_shard(sharded, mesh=mesh)
        KERNEL_TENSORS.clear()
        opt = train(sharded, paper, rank=rank, world=WORLD, backend=backend)
        kernel_tensors = sum(KERNEL_TENSORS)
        diffs = {}
        for (name, p), ref in zip(sharded.named_parameters(), reference.parameters()):
            diffs[name] = (p.full_tensor() - ref.detach()).abs().max().item()
        placements = {
            name: type(opt.state[p]["exp_avg_sq"].placements[0]).__name__ for name, p in sharded.named_parameters()
        }
        global_shapes = {name: list(opt.state[p]["exp_avg_sq"].shape) for name, p in sharded.named_parameters()}
        all_dtensor = all(
            isinstance(v, DTensor) for s in opt.state.values() for k, v in s.items() if k != "step"
        )
        results[("paper" if paper else "adam_mini") + ("" if backend == "torch" else "/native")] = {
            "max_diff": diffs,
            "placements": placements,
            "global_shapes": global_shapes,
            "all_dtensor": all_dtensor,
            "collectives_per_step": count_collectives(opt, sharded),
            "kernel_tensors": kernel_tensors,
        }
    finish(rank, out, results)


if __name__ == "__main__":
    spawn(worker, sys.argv[1], WORLD)
