"""Optimizer state memory on GPT-2 small (124M parameters), measured from the real state tensors.

Builds ``GPT(GPTConfig.gpt2_small())`` on the CPU, gives every parameter a random gradient, runs one
step of each optimizer and counts the bytes of the state it created (each piece of memory once, see
``lightning_lowmem.utils.memory``). Targets from DESIGN.md: AdamW 8.00 bytes/param, AdamMini <= 4.05,
Eve <= 4.10, MicroAdam <= 1.00; AdamMini with ``exp_avg_dtype`` bf16 <= 2.05, int8 <= 1.05, int4 <= 0.55
(codes, scales, ``v`` and ``step`` counted), next to torchao's ``AdamW8bit``/``AdamW4bit`` (the
``bench`` extra; left out where it is not installed). The ``adam_mini_paper`` preset keeps both embeddings elementwise, as the paper's
Algorithms 2-4 do; they are a third of GPT-2 small's parameters, so it lands at 5.27 and has no
target here.

    python benchmarks/state_memory.py            # a table
    python benchmarks/state_memory.py --json     # the same rows as JSON

Takes about a minute and 2.6 GB of memory on a 2-core CPU (torchao's optimizers compile their step).
"""

from __future__ import annotations

import argparse
import importlib.util
import gc
import json
from collections.abc import Callable

import torch
from torch import nn

from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.optim import AdamMini, Eve, MicroAdam
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM
from lightning_lowmem.utils import optimizer_param_count, optimizer_state_bytes

# name -> (optimizer factory, bytes/param it must not exceed at two decimals, or None)
OPTIMIZERS: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], float | None]] = {
    "AdamW": (lambda model: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), 8.00),
    "AdamMini (adam_mini)": (lambda model: AdamMini(model, lr=1e-4, preset="adam_mini", backend="torch"), 4.05),
    "AdamMini (adam_mini_paper)": (
        lambda model: AdamMini(model, lr=1e-4, preset="adam_mini_paper", backend="torch"), None
    ),
    "Eve": (lambda model: Eve(model, lr=1e-4, backend="torch"), 4.10),
    "MicroAdam": (lambda model: MicroAdam(model, lr=1e-4, backend="torch"), 1.00),
    "AdamMini bf16 m": (lambda model: AdamMini(model, lr=1e-4, exp_avg_dtype="bf16"), 2.05),
    "AdamMini int8 m": (lambda model: AdamMini(model, lr=1e-4, exp_avg_dtype="int8"), 1.05),
    "AdamMini int4 m": (lambda model: AdamMini(model, lr=1e-4, exp_avg_dtype="int4"), 0.55),
    "torchao AdamW8bit": (lambda model: _torchao("AdamW8bit", model), None),
    "torchao AdamW4bit": (lambda model: _torchao("AdamW4bit", model), None),
}


def _torchao(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """torchao's low-bit AdamW (the ``bench`` extra): its state tensors hold codes and scales."""
    import torchao.optim

    return getattr(torchao.optim, name)(model.parameters(), lr=1e-4)


def measure(model: nn.Module) -> list[dict[str, float | int | str | None]]:
    """One optimizer step per entry of :data:`OPTIMIZERS` on ``model``; one result row each."""
    rows = []
    adamw_bytes = None
    for name, (make_optimizer, target) in OPTIMIZERS.items():
        if name.startswith("torchao") and importlib.util.find_spec("torchao") is None:
            continue  # the bench extra is not installed
        optimizer = make_optimizer(model)
        optimizer.step()
        params = optimizer_param_count(optimizer)
        state_bytes = optimizer_state_bytes(optimizer)
        adamw_bytes = adamw_bytes or state_bytes  # AdamW comes first
        rows.append(
            dict(
                optimizer=name,
                params=params,
                state_mb=state_bytes / 1e6,
                bytes_per_param=state_bytes / params,
                saving_vs_adamw_pct=100.0 * (1.0 - state_bytes / adamw_bytes),
                target_bytes_per_param=target,
            )
        )
        del optimizer
        gc.collect()
    return rows


def format_table(rows: list[dict[str, float | int | str | None]]) -> str:
    """The rows as a fixed-width text table."""
    header = (f"{'optimizer':<28} {'params':>12} {'state MB':>10} {'bytes/param':>12} "
              f"{'saving vs AdamW':>16} {'target':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        target = r["target_bytes_per_param"]
        verdict = "-" if target is None else f"<= {target:.2f} " + ("ok" if meets_target(r) else "MISSED")
        lines.append(
            f"{r['optimizer']:<28} {r['params']:>12,} {r['state_mb']:>10.1f} {r['bytes_per_param']:>12.3f} "
            f"{r['saving_vs_adamw_pct']:>15.1f}% {verdict:>10}"
        )
    return "\n".join(lines)


def meets_target(row: dict[str, float | int | str | None]) -> bool:
    """Whether a row's bytes/param, rounded to two decimals as the targets are, is within its target."""
    target = row["target_bytes_per_param"]
    return target is None or round(float(row["bytes_per_param"]), 2) <= target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT(GPTConfig.gpt2_small())
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    rows = measure(model)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"Optimizer state after one step, GPT-2 small, fp32 states "
              f"(AdamW reference: {ADAMW_STATE_BYTES_PER_PARAM} bytes/param)")
        print(format_table(rows))


if __name__ == "__main__":
    main()
