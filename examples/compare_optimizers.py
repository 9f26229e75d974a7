"""Train the same small GPT under AdamW, AdamMini, Eve and MicroAdam, and compare them in one table.

Every optimizer starts from the same initial weights and sees the same batches in the same order
(next-byte prediction on the Python standard library's docstrings, built on first use, no
download), with the same recipe: betas, weight decay (matrices only), warmup and cosine decay. Each
runs at a learning rate where it is stable on this model, the best of the sweep in
docs/benchmarks.md: 1e-3 for AdamW, AdamMini and Eve, 3e-3 for MicroAdam (at 1e-3 it lags
AdamW by 0.6 nats; at 3e-3 AdamMini lags by 0.14). ``--lr`` gives all four one rate instead.

The table gives, for each optimizer:

* train loss: the mean training loss of the last 10% of the steps; val loss: on held-out text,
  and its difference to AdamW's;
* state B/param: bytes of optimizer state per parameter, counted from the state tensors (fp32 AdamW: 8);
* step ms: median wall time of a whole training step (forward, backward, optimizer step);
  optimizer ms: of ``optimizer.step()`` alone (eager PyTorch, no ``torch.compile``);
* distance to AdamW: ``||w - w_AdamW|| / ||w_AdamW||`` over all weights at the end, the relative L2
  distance to where AdamW took the same initial weights with the same batches.

Each optimizer is also one TensorBoard run under one directory (``runs/compare/version_<n>/adamw``,
``.../adam_mini``, ...), with the tags of the ``lowmem`` callbacks, so TensorBoard lays the four
over each other: training loss, learning rate, state MB, and the distance to AdamW's weights.

    python examples/compare_optimizers.py                       # about a minute on a 2-core CPU
    python examples/compare_optimizers.py --steps 600 --lr 1e-3
    python examples/compare_optimizers.py --n-layer 6 --n-embd 192 --threads 2
    tensorboard --logdir runs/compare

A plain PyTorch loop: no Lightning, nothing hidden; the measurements are the callbacks' own
(``lightning_lowmem.callbacks.core``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_lowmem import AdamMini, Eve, MicroAdam, SchedulerConfig
from lightning_lowmem.callbacks.core import MB, measure_state_memory, param_kinds, weight_distance
from lightning_lowmem.data import CharTextDataModule
from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.optim.registry import decay_groups
from lightning_lowmem.optim.schedulers import build_scheduler
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM, NO_DECAY_ROLES

# The run names are the optimizers' config names (as in examples/train_gpt.py's runs).
RUNS = {"AdamW": "adamw", "AdamMini": "adam_mini", "Eve": "eve", "MicroAdam": "micro_adam"}
# Each optimizer's best peak lr in docs/benchmarks.md's sweep on this model (200 steps of 16 x 64 bytes).
STABLE_LR = {"AdamW": 1e-3, "AdamMini": 1e-3, "Eve": 1e-3, "MicroAdam": 3e-3}
# The custom-scalars layout of the comparison: the callbacks' tags, one line (one run, one colour) per
# optimizer. The validation loss, measured once at the end, is in the table.
LAYOUT = {
    "compare optimizers": {
        "training loss": ["Multiline", [r"^train/loss$"]],
        "state MB": ["Multiline", [r"^lowmem/state/total_mb$"]],
        "relative L2 distance to AdamW": ["Multiline", [r"^lowmem/trajectory/compare/rel_l2$"]],
        "learning rate": ["Multiline", [r"^lr$"]],
    }
}


def make_optimizer(name: str, model: GPT, args: argparse.Namespace) -> torch.optim.Optimizer:
    """One recipe for all four, each at its stable lr (or ``--lr``). Our optimizers leave biases, norms and
    embeddings undecayed, so AdamW and MicroAdam get the same two param groups (``decay_groups``): a fair
    baseline."""
    hparams = dict(lr=args.lr or STABLE_LR[name], betas=(0.9, 0.99), weight_decay=0.1)
    if name == "AdamW":
        return torch.optim.AdamW(decay_groups(model, NO_DECAY_ROLES), **hparams)
    if name == "AdamMini":
        return AdamMini(model, **hparams, backend="torch")  # blocks read from the model's structure
    if name == "Eve":
        return Eve(model, **hparams, backend="torch")
    if name == "MicroAdam":
        return MicroAdam(decay_groups(model, NO_DECAY_ROLES), **hparams, backend="torch")
    raise ValueError(f"Unknown optimizer {name!r}; choose one of AdamW, AdamMini, Eve, MicroAdam.")


def train(name: str, init: GPT, data: CharTextDataModule, args: argparse.Namespace, writer: SummaryWriter,
          reference: dict[int, dict[str, torch.Tensor]]) -> dict:
    """Train a copy of ``init`` for ``args.steps`` steps with optimizer ``name``; return its results.

    Every ``args.every`` steps (and after the last) its state and its distance to ``reference`` (AdamW's
    weights after the same number of steps) go to ``writer``; an empty ``reference`` is filled in.
    """
    model = copy.deepcopy(init)  # the same initial weights for every optimizer
    optimizer = make_optimizer(name, model, args)
    schedule = SchedulerConfig(name="cosine", warmup_steps=max(1, args.steps // 15), min_lr_ratio=0.1)
    scheduler = build_scheduler(optimizer, schedule, total_steps=args.steps)
    batches = itertools.chain.from_iterable(data.train_dataloader() for _ in itertools.count())  # same order each time
    names = {p: n for n, p in model.named_parameters()}
    kinds = None
    losses, step_times, optimizer_times = [], [], []
    model.train()
    for step in range(1, args.steps + 1):
        x, y = next(batches)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
        optimizer.step()
        scheduler.step()
        t2 = time.perf_counter()
        losses.append(loss.item())
        step_times.append(t2 - t0)
        optimizer_times.append(t2 - t1)
        writer.add_scalar("train/loss", loss.item(), step)
        if step % args.every and step != args.steps:
            continue
        # what the callbacks measure, from the same functions: state MB, distance to AdamW's weights
        memory = measure_state_memory(optimizer)
        writer.add_scalar("lowmem/state/total_mb", memory.total_bytes / MB, step)
        weights = {names[p]: p.detach().clone() for p in model.parameters()}
        if name == "AdamW":
            reference[step] = weights
        kinds = kinds or {names[p]: k for p, k in param_kinds(optimizer).items()}
        distance = weight_distance(weights, reference[step], kinds)
        writer.add_scalar("lowmem/trajectory/compare/rel_l2", distance.rel_l2, step)

    model.eval()
    with torch.no_grad():
        val = [model(x, y)[1].item() for x, y in itertools.islice(data.val_dataloader(), args.val_batches)]
    writer.add_scalar("val/loss", sum(val) / len(val), args.steps)
    writer.flush()
    tail = losses[-max(1, args.steps // 10):]
    return dict(
        name=name,
        lr=optimizer.param_groups[0]["initial_lr"],
        train_loss=sum(tail) / len(tail),
        val_loss=sum(val) / len(val),
        bytes_per_param=memory.bytes_per_param,
        step_ms=1e3 * statistics.median(step_times),
        optimizer_ms=1e3 * statistics.median(optimizer_times),
        distance=distance.rel_l2,
    )


def next_version(root: Path) -> Path:
    """``root/version_<n>`` with the first unused ``n``: one comparison, one directory of four runs."""
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    return root / f"version_{n}"


def main() -> None:
    tiny = GPTConfig.tiny()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per optimizer")
    parser.add_argument("--lr", type=float, default=None,
                        help="one peak learning rate for all four (default: each its stable one, "
                        + ", ".join(f"{k} {v:g}" for k, v in STABLE_LR.items()) + ")")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=tiny.block_size, help="bytes per sequence")
    parser.add_argument("--n-layer", type=int, default=tiny.n_layer)
    parser.add_argument("--n-head", type=int, default=tiny.n_head)
    parser.add_argument("--n-embd", type=int, default=tiny.n_embd)
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="steps between state and distance measurements")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/compare"), help="TensorBoard runs go to LOG_DIR/version_<n>/")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings)")
    args = parser.parse_args()
    for flag in ("steps", "every", "val_batches"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPTConfig.tiny(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    init = GPT(config)
    data = CharTextDataModule(block_size=args.block_size, batch_size=args.batch_size, seed=args.seed)
    data.prepare_data()
    data.setup()
    log_dir = next_version(args.log_dir)
    lrs = "lr " + (f"{args.lr:g} for all" if args.lr else ", ".join(f"{k} {v:g}" for k, v in STABLE_LR.items()))
    print(f"GPT: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
          f"{init.num_params():,} parameters; {args.steps} steps of {args.batch_size} x {args.block_size} bytes, "
          f"{lrs}; {args.threads} thread(s)\n")

    results, reference = [], {}
    for name, run in RUNS.items():  # AdamW first: the reference for the distance
        start = time.perf_counter()
        with SummaryWriter(str(log_dir / run)) as writer:
            writer.add_custom_scalars(LAYOUT)
            results.append(train(name, init, data, args, writer, reference))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)

    adamw = results[0]
    header = ("optimizer", "lr", "train loss", "val loss", "vs AdamW", "state B/param", "step ms", "optimizer ms",
              "distance to AdamW")
    rows = [
        (r["name"], f"{r['lr']:g}", f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}",
         f"{r['val_loss'] - adamw['val_loss']:+.4f}", f"{r['bytes_per_param']:.2f}", f"{r['step_ms']:.1f}",
         f"{r['optimizer_ms']:.2f}", f"{r['distance']:.4f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\nstate B/param: bytes of optimizer state per parameter (fp32 AdamW: {ADAMW_STATE_BYTES_PER_PARAM:.2f}); "
          "distance: ||w - w_AdamW|| / ||w_AdamW|| after the last step\n")
    for r in results[1:]:
        gap = r["val_loss"] - adamw["val_loss"]
        print(f"{r['name']} ended {abs(gap):.3f} nats {'above' if gap > 0 else 'below'} AdamW's validation loss "
              f"({100 * gap / adamw['val_loss']:+.1f}%), its weights {100 * r['distance']:.0f}% of the weights' norm "
              f"away from AdamW's, with {r['bytes_per_param'] / adamw['bytes_per_param']:.0%} of its state")
    print(f"\nTensorBoard: tensorboard --logdir {log_dir}")


if __name__ == "__main__":
    main()
