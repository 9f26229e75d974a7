"""What state each parameter of an optimizer holds, asked through one small protocol (no Lightning inside).

An optimizer that implements :class:`DescribesState` (``AdamMini``, ``Eve``, ``MicroAdam``) says,
for every parameter, the segments its state is made of: ``(kind, parameters, v entries)`` each, in
the order its second-moment tensor ``exp_avg_sq`` holds them. A kind is a block kind of the plan
(``full``, ``row``, ``head``, ``tensor``; GPT-2's fused ``c_attn`` is two segments, ``head`` for
Q and K then ``row`` for V, as :meth:`~lightning_lowmem.partition.BlockPlan.summary` counts them;
an interleaved layout alternates its segments head by head)
or ``compressed`` for MicroAdam's compressed parameters. Any other optimizer (``torch.optim.AdamW``)
is one ``full`` segment per parameter: elementwise state.

A parameter with segments of several kinds is named by them joined with ``+`` (``head+row``) where
one kind per parameter is needed (the trajectory distance).

Example::

    >>> segments = state_segments(AdamMini(model))
    >>> segments[model.transformer.h[0].attn.c_attn.weight]
    (Segment(kind='head', numel=32768, entries=8), Segment(kind='row', numel=16384, entries=128))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_lowmem.partition import KINDS

#: Every kind a segment can have, in the order tables and tags list them.
KIND_ORDER = (*KINDS, "compressed")


class Segment(NamedTuple):
    """A part of a parameter whose state has one kind.

    Args:
        kind: ``full``, ``row``, ``head``, ``tensor`` or ``compressed``.
        numel: parameters in the segment (global counts under FSDP2).
        entries: entries of ``exp_avg_sq`` for the segment (0 when it has none).
    """

    kind: str
    numel: int
    entries: int


@runtime_checkable
class DescribesState(Protocol):
    """An optimizer that says what state each of its parameters holds.

    ``state_segments()`` returns ``parameter -> [(kind, parameters, v entries), ...]`` (plain tuples
    or :class:`Segment`), the segments in the order ``exp_avg_sq`` holds them; ``summary()`` a text
    table of the state layout (the block plan, or MicroAdam's per-parameter table).
    """

    def state_segments(self) -> Mapping[torch.Tensor, Sequence[tuple[str, int, int]]]: ...

    def summary(self) -> str: ...


def state_segments(optimizer: Optimizer) -> dict[torch.Tensor, tuple[Segment, ...]]:
    """``parameter -> segments`` for every parameter ``optimizer`` updates (see the module docstring)."""
    if isinstance(optimizer, DescribesState):
        return {p: tuple(Segment(*s) for s in segs) for p, segs in optimizer.state_segments().items()}
    return {p: (Segment("full", p.numel(), p.numel()),) for group in optimizer.param_groups for p in group["params"]}


def state_summary(optimizer: Optimizer) -> str | None:
    """The optimizer's own table of its state layout, ``None`` for one that has none (AdamW)."""
    return optimizer.summary() if isinstance(optimizer, DescribesState) else None


def param_kind(segments: Sequence[Segment]) -> str:
    """One name for a parameter's state: its kind, or its segments' distinct kinds joined by ``+``."""
    return "+".join(dict.fromkeys(s.kind for s in segments))


def param_kinds(optimizer: Optimizer) -> dict[torch.Tensor, str]:
    """``parameter -> kind`` (see :func:`param_kind`) for every parameter ``optimizer`` updates."""
    return {p: param_kind(segs) for p, segs in state_segments(optimizer).items()}


def kinds_present(kinds: Iterable[str]) -> tuple[str, ...]:
    """The distinct ``kinds`` in :data:`KIND_ORDER` order (joined and unknown kinds last, sorted)."""
    present = set(kinds)
    return tuple(k for k in KIND_ORDER if k in present) + tuple(sorted(present - set(KIND_ORDER)))


def parameter_names(module: nn.Module, optimizers: Iterable[Optimizer]) -> dict[torch.Tensor, str]:
    """``parameter -> name`` for every parameter of ``optimizers``: the module's name for it, else ``optimizer<i>.group<j>.param<k>``."""
    names = {p: n for n, p in module.named_parameters()}
    out: dict[torch.Tensor, str] = {}
    for oi, optimizer in enumerate(optimizers):
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                out[p] = names.get(p, f"optimizer{oi}.group{gi}.param{pi}")
    return out
