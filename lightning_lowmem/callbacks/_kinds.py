"""Which kind of second-moment block each parameter of an optimizer has (no Lightning inside).

A parameter's kind is its block kind in the optimizer's :class:`~lightning_lowmem.partition.BlockPlan`
(``full``, ``row``, ``head``, ``tensor``, or ``mixed`` for a fused projection whose segments differ),
``compressed`` for the parameters :class:`~lightning_lowmem.optim.MicroAdam` compresses, and
``full`` (elementwise state, as AdamW) for every other optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_lowmem.optim import MicroAdam
from lightning_lowmem.optim.registry import plan_of
from lightning_lowmem.partition import KINDS, ParamBlocks

#: Every kind a parameter can have, in the order tables and tags list them.
KIND_ORDER = (*KINDS, "mixed", "compressed")


def param_kinds(optimizer: Optimizer) -> dict[torch.Tensor, str]:
    """``parameter -> kind`` for every parameter ``optimizer`` updates (see the module docstring)."""
    plan = plan_of(optimizer)
    if plan is not None and hasattr(optimizer, "named_params"):
        return {p: plan[name].kind for name, p, _ in optimizer.named_params()}
    if isinstance(optimizer, MicroAdam):
        return {
            p: "compressed" if optimizer.is_compressed(p, group) else "full"
            for group in optimizer.param_groups
            for p in group["params"]
        }
    return {p: "full" for group in optimizer.param_groups for p in group["params"]}


def param_blocks(optimizer: Optimizer) -> dict[torch.Tensor, ParamBlocks]:
    """``parameter -> ParamBlocks`` of a block optimizer's plan (empty for other optimizers)."""
    plan = plan_of(optimizer)
    if plan is None or not hasattr(optimizer, "named_params"):
        return {}
    return {p: plan[name] for name, p, _ in optimizer.named_params()}


def segment_sizes(entry: ParamBlocks) -> list[tuple[str, int]]:
    """``(kind, entries of v)`` of each segment of a non-``full`` parameter, in the order ``v`` holds them."""
    return [(spec.kind, spec.num_blocks(rows, entry.cols)) for spec, rows in entry.segments]


def kinds_present(kinds: Iterable[str]) -> tuple[str, ...]:
    """The distinct ``kinds`` in :data:`KIND_ORDER` order (unknown kinds last, sorted)."""
    present = set(kinds)
    return tuple(k for k in KIND_ORDER if k in present) + tuple(sorted(present - set(KIND_ORDER)))


def parameter_names(module: nn.Module, optimizers: Iterable[Optimizer]) -> dict[torch.Tensor, str]:
    """``parameter -> name`` for every parameter of ``optimizers``: the module's name for it, else ``group<i>.param<j>``."""
    names = {p: n for n, p in module.named_parameters()}
    out: dict[torch.Tensor, str] = {}
    for oi, optimizer in enumerate(optimizers):
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                out[p] = names.get(p, f"optimizer{oi}.group{gi}.param{pi}")
    return out
