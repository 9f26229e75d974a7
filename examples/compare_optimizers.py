"""Train the same small GPT under AdamW, AdamMini, Eve and MicroAdam, and compare them in one table.

Every optimizer starts from the same initial weights and sees the same batches in the same order
(next-byte prediction on the Python standard library's docstrings, built on first use, no
download), with the same recipe: learning rate, betas, weight decay (matrices only), warmup and
cosine decay. The table gives, for each optimizer:

* train loss: the mean training loss of the last 10% of the steps; val loss: on held-out text;
* state B/param: bytes of optimizer state per parameter, counted from the state tensors (fp32 AdamW: 8);
* step ms: median wall time of a whole training step (forward, backward, optimizer step);
  optimizer ms: of ``optimizer.step()`` alone (eager PyTorch, no ``torch.compile``);
* distance to AdamW: ``||w - w_AdamW|| / ||w_AdamW||`` over all weights at the end, the relative L2
  distance to where AdamW took the same initial weights with the same batches.

    python examples/compare_optimizers.py                       # about a minute on a 2-core CPU
    python examples/compare_optimizers.py --steps 600 --lr 1e-3
    python examples/compare_optimizers.py --n-layer 6 --n-embd 192 --threads 2

A plain PyTorch loop: no Lightning, nothing hidden.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import time

import torch

from lightning_lowmem import AdamMini, Eve, MicroAdam, SchedulerConfig
from lightning_lowmem.data import CharTextDataModule
from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.optim.registry import decay_groups
from lightning_lowmem.optim.schedulers import build_scheduler
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM, NO_DECAY_ROLES
from lightning_lowmem.utils import optimizer_state_bytes


def make_optimizer(name: str, model: GPT, args: argparse.Namespace) -> torch.optim.Optimizer:
    """One recipe for all four. Our optimizers leave biases, norms and embeddings undecayed, so AdamW
    and MicroAdam get the same two param groups (``decay_groups``): a fair baseline."""
    hparams = dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    if name == "AdamW":
        return torch.optim.AdamW(decay_groups(model, NO_DECAY_ROLES), **hparams)
    if name == "AdamMini":
        return AdamMini(model, **hparams, backend="torch")  # blocks read from the model's structure
    if name == "Eve":
        return Eve(model, **hparams, backend="torch")
    if name == "MicroAdam":
        return MicroAdam(decay_groups(model, NO_DECAY_ROLES), **hparams, backend="torch")
    raise ValueError(f"Unknown optimizer {name!r}; choose one of AdamW, AdamMini, Eve, MicroAdam.")


def train(name: str, init: GPT, data: CharTextDataModule, args: argparse.Namespace) -> dict:
    """Train a copy of ``init`` for ``args.steps`` steps with optimizer ``name``; return its results."""
    model = copy.deepcopy(init)  # the same initial weights for every optimizer
    optimizer = make_optimizer(name, model, args)
    schedule = SchedulerConfig(name="cosine", warmup_steps=max(1, args.steps // 15), min_lr_ratio=0.1)
    scheduler = build_scheduler(optimizer, schedule, total_steps=args.steps)
    batches = itertools.chain.from_iterable(data.train_dataloader() for _ in itertools.count())  # same order each time
    losses, step_times, optimizer_times = [], [], []
    model.train()
    for _ in range(args.steps):
        x, y = next(batches)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        t2 = time.perf_counter()
        losses.append(loss.item())
        step_times.append(t2 - t0)
        optimizer_times.append(t2 - t1)

    model.eval()
    with torch.no_grad():
        val = [model(x, y)[1].item() for x, y in itertools.islice(data.val_dataloader(), args.val_batches)]
    params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    tail = losses[-max(1, args.steps // 10):]
    return dict(
        name=name,
        model=model,
        train_loss=sum(tail) / len(tail),
        val_loss=sum(val) / len(val),
        bytes_per_param=optimizer_state_bytes(optimizer) / params,
        step_ms=1e3 * statistics.median(step_times),
        optimizer_ms=1e3 * statistics.median(optimizer_times),
    )


@torch.no_grad()
def relative_distance(model: GPT, reference: GPT) -> float:
    """``||w - w_ref|| / ||w_ref||`` over all parameters together."""
    diff = sum((p - q).double().square().sum() for p, q in zip(model.parameters(), reference.parameters()))
    norm = sum(q.double().square().sum() for q in reference.parameters())
    return math.sqrt(diff / norm)


def main() -> None:
    tiny = GPTConfig.tiny()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per optimizer")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, the same for all")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=tiny.block_size, help="bytes per sequence")
    parser.add_argument("--n-layer", type=int, default=tiny.n_layer)
    parser.add_argument("--n-head", type=int, default=tiny.n_head)
    parser.add_argument("--n-embd", type=int, default=tiny.n_embd)
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPTConfig.tiny(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    init = GPT(config)
    data = CharTextDataModule(block_size=args.block_size, batch_size=args.batch_size, seed=args.seed)
    data.prepare_data()
    data.setup()
    print(f"GPT: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
          f"{init.num_params():,} parameters; {args.steps} steps of {args.batch_size} x {args.block_size} bytes, "
          f"lr {args.lr:g}, {args.threads} thread(s)\n")

    results = []
    for name in ("AdamW", "AdamMini", "Eve", "MicroAdam"):  # AdamW first: the reference for the distance
        start = time.perf_counter()
        results.append(train(name, init, data, args))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)

    adamw = results[0]["model"]
    header = ("optimizer", "train loss", "val loss", "state B/param", "step ms", "optimizer ms", "distance to AdamW")
    rows = [
        (r["name"], f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{r['bytes_per_param']:.2f}",
         f"{r['step_ms']:.1f}", f"{r['optimizer_ms']:.2f}", f"{relative_distance(r['model'], adamw):.4f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\nstate B/param: bytes of optimizer state per parameter (fp32 AdamW: {ADAMW_STATE_BYTES_PER_PARAM:.2f}); "
          "distance: ||w - w_AdamW|| / ||w_AdamW|| after the last step")


if __name__ == "__main__":
    main()
