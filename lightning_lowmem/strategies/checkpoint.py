"""Checks that an optimizer's state can be checkpointed under FSDP2 without being saved wrong.

``torch.distributed.checkpoint`` (both the sharded DCP directory and the gathered full state dict)
knows how to save and reshard a state tensor only if it is a ``DTensor`` with ``Shard`` or
``Replicate`` placements. A plain tensor kept for a sharded parameter is each rank's own piece:
the full state dict keeps rank 0's piece as if it were the whole, DCP keeps one rank's, and a
resume on another world size gets shapes that fit nothing. A ``Partial`` DTensor (sums not yet
reduced) cannot be saved at all. :func:`check_optimizer_state` refuses both before saving, naming
the parameter and the state key.

The scalar ``step`` every torch optimizer keeps is the same on all ranks and is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial
from torch.optim import Optimizer

#: State keys that may stay plain tensors on a sharded parameter (the same value on every rank).
REPLICATED_SCALAR_KEYS = frozenset({"step"})


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of ``model`` (a tied one under its first name)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def check_optimizer_state(optimizer: Optimizer, names: dict[int, str] | None = None) -> None:
    """Raise if a state tensor of a sharded (``DTensor``) parameter would be checkpointed wrong.

    Args:
        optimizer: the optimizer (its live ``state``, before ``get_optimizer_state_dict``).
        names: ``id(parameter) -> name`` for the messages (e.g. :func:`parameter_names`).

    Raises:
        ValueError: for a plain tensor (other than a 0-dim ``step``) on a ``DTensor`` parameter, or a
            ``Partial`` ``DTensor`` anywhere, naming the parameter and the key.
    """
    names = names or {}
    owner = type(optimizer).__name__
    for i, p in enumerate(_params(optimizer.param_groups)):
        state = optimizer.state.get(p)
        if not state:
            continue
        name = names.get(id(p), f"param {i}")
        for key, value in _tensors(state):
            if isinstance(value, DTensor):
                if any(isinstance(pl, Partial) for pl in value.placements):
                    raise ValueError(
                        f"Cannot checkpoint {owner} state {key!r} of {name!r}: it is a DTensor with Partial "
                        f"placements {value.placements} (unreduced sums), which torch.distributed.checkpoint cannot "
                        "save. Reduce it in the optimizer step (e.g. `.redistribute(placements=[Replicate()])`) "
                        "and store the result."
                    )
            elif isinstance(p, DTensor) and not (key in REPLICATED_SCALAR_KEYS and value.dim() == 0):
                raise ValueError(
                    f"Cannot checkpoint {owner} state {key!r} of the sharded parameter {name!r}: it is a plain "
                    f"torch.Tensor of shape {list(value.shape)} (this rank's piece), not a DTensor, so it would be "
                    "saved as if it were the whole state and could not be resharded on resume. Keep it as a "
                    "DTensor with the parameter's mesh: Shard(0) for per-row state "
                    "(`DTensor.from_local(t, p.device_mesh, p.placements)`), Replicate() for state reduced "
                    "across ranks."
                )


def _params(param_groups: Iterable[dict[str, Any]]) -> Iterable[torch.Tensor]:
    for group in param_groups:
        yield from group["params"]


def _tensors(state: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a parameter's state, nested dicts flattened to ``a.b`` keys."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
