"""The stored momentum of AdamMini/Eve as optimizer state: creation, checks and conversion on load.

A parameter's momentum is the state key ``exp_avg``: a tensor in the parameter's dtype
(``exp_avg_dtype="fp32"``), bf16 values, or int8/int4 codes with one fp32 scale per block under
:data:`SCALE_KEY` (:mod:`lightning_lowmem.kernels.momentum_formats`). Under FSDP2 the codes and
the scales are DTensors with the parameter's placements: blocks never span two rows, so the rows
on a rank carry their scales with them, and sharded checkpoints reshard like the parameter.

Example::

    >>> state = new_momentum(param, MomentumFormat.of("int8"))
    >>> sorted(state)
    ['exp_avg', 'exp_avg_scale']
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_lowmem.kernels.momentum_formats import DEFAULT_BLOCK, MomentumFormat, QuantizedMomentum, decode, encode_
from lightning_lowmem.optim.sharding import to_local

log = logging.getLogger(__name__)

#: the state key of the per-block scales of int8/int4 momentum.
SCALE_KEY = "exp_avg_scale"
#: the param-group keys that describe how the momentum is stored, with their values when absent
#: (a checkpoint written before they existed holds momentum in the parameter's dtype).
FORMAT_DEFAULTS = {"exp_avg_dtype": "fp32", "exp_avg_block": DEFAULT_BLOCK}


def group_format(group: dict[str, Any], param: Tensor, banked: bool = False) -> MomentumFormat | None:
    """The stored format of ``param``'s momentum in a param group; ``None``: a tensor in the
    parameter's dtype (``"fp32"``, and int8/int4 for parameters of fewer than 2 dims or updated
    bank by bank (``banked``), whose rows are not the storage rows)."""
    fmt = MomentumFormat.of(group.get("exp_avg_dtype", "fp32"), group.get("exp_avg_block", DEFAULT_BLOCK))
    if fmt.name == "fp32" or not fmt.applies_to(param) or (banked and fmt.quantized):
        return None
    return fmt


def new_momentum(param: Tensor, fmt: MomentumFormat | None) -> dict[str, Tensor]:
    """Zero momentum state of ``param`` (``exp_avg`` and, for int8/int4, :data:`SCALE_KEY`),
    DTensors with the parameter's mesh and placements where ``param`` is one."""
    if fmt is None:
        return {"exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format)}
    local = to_local(param)
    state = fmt.new_state(tuple(local.shape), local.device)
    codes_shape, scales_shape = fmt.state_shapes(tuple(param.shape))
    out = {"exp_avg": _like(param, state.codes, codes_shape)}
    if state.scales is not None:
        out[SCALE_KEY] = _like(param, state.scales, scales_shape)
    return out


def check_momentum_state(name: str, param: Tensor, fmt: MomentumFormat | None, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes the momentum keys of a loaded ``state`` must have; raises for a wrong code dtype."""
    codes_shape, scales_shape = (tuple(param.shape), None) if fmt is None else fmt.state_shapes(tuple(param.shape))
    exp_avg = state.get("exp_avg")
    if fmt is not None and torch.is_tensor(exp_avg) and exp_avg.dtype != fmt.dtype:
        raise ValueError(
            f"Cannot load optimizer state for {name!r}: 'exp_avg' is {exp_avg.dtype}, but exp_avg_dtype={fmt.name!r} "
            f"keeps {fmt.dtype}. Build the optimizer with the exp_avg_dtype the checkpoint was written with."
        )
    return {"exp_avg": codes_shape} if scales_shape is None else {"exp_avg": codes_shape, SCALE_KEY: scales_shape}


def convert_momentum_(optimizer: Any, state_dict: dict[str, Any], level: int = logging.INFO) -> dict[str, Any]:
    """``state_dict`` with every momentum saved in another format re-encoded in the optimizer's.

    Each group's saved ``exp_avg_dtype``/``exp_avg_block`` is compared with the optimizer's; where
    they differ, every saved momentum is decoded to fp32 and encoded again (one log line for the
    whole load, at ``level``). The saved groups then carry the optimizer's formats. Returns a new
    dict; the input is left as it is.

    Raises:
        ValueError: a saved momentum whose keys, shapes or dtypes do not fit its saved format.
    """
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups):
        return state_dict  # LowMemOptimizer.load_state_dict reports it
    saved_state = dict(state_dict.get("state", {}))
    groups, converted, changes = [], [], set()
    for saved_group, group in zip(saved_groups, optimizer.param_groups):
        formats, ours = group_formats(saved_group), group_formats(group)
        groups.append({**saved_group, **ours})
        if formats == ours:
            continue
        for saved_id, param in zip(saved_group["params"], group["params"]):
            if saved_id not in saved_state:
                continue
            name = optimizer.param_name(param)
            old, new = (optimizer._momentum_format(name, param, f) for f in (formats, ours))
            if old != new:
                saved_state[saved_id] = _convert(name, param, saved_state[saved_id], old, new)
                converted.append(name)
                changes.add(f"{_label(old)} -> {_label(new)}")
    if converted:
        log.log(level, "Converted the saved momentum of %d tensors to this optimizer's exp_avg_dtype: %s.",
                len(converted), ", ".join(sorted(changes)))
    return {**state_dict, "state": saved_state, "param_groups": groups}


def group_formats(group: dict[str, Any]) -> dict[str, Any]:
    """The momentum format keys of a (saved) param group: ``{"exp_avg_dtype": ..., "exp_avg_block": ...}``."""
    return {key: group.get(key, default) for key, default in FORMAT_DEFAULTS.items()}


def stores_momentum_formats(optimizer: Any) -> bool:
    """Whether ``optimizer``'s param groups say how its momentum is stored (AdamMini, Eve)."""
    return bool(optimizer.param_groups) and all("exp_avg_dtype" in group for group in optimizer.param_groups)


@contextlib.contextmanager
def saved_momentum_formats(optimizer: Any, saved_groups: Sequence[dict[str, Any]] | None) -> Iterator[None]:
    """Within the block, ``optimizer`` stores its momentum as the checkpoint's ``saved_groups`` do.

    A checkpoint loaded by ``torch.distributed.checkpoint`` is read into a template built from the
    live optimizer (``get_optimizer_state_dict``): its keys, shapes and dtypes must be the saved ones.
    On entry each group takes the saved ``exp_avg_dtype``/``exp_avg_block`` and the live state (if
    any) is re-encoded in them; on exit the optimizer's own formats come back and the state (loaded
    in the block) is converted to them, with one log line, as :meth:`load_state_dict` does for a
    state dict. Does nothing for an optimizer without momentum formats, for groups that do not match
    in number (loading reports it), or when the formats are the same. If the block raises, the
    optimizer's formats come back and its state is dropped (it may be half loaded).

    Example::

        >>> with saved_momentum_formats(optimizer, saved_param_groups):
        ...     state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the saved layout
        ...     dcp.load(state, checkpoint_id=path)
        ...     set_optimizer_state_dict(model, optimizer, state["optimizer"])
    """
    if (saved_groups is None or not stores_momentum_formats(optimizer)
            or len(saved_groups) != len(optimizer.param_groups)):
        yield
        return
    ours = [group_formats(group) for group in optimizer.param_groups]
    theirs = [group_formats(group) for group in saved_groups]
    if ours == theirs:
        yield
        return
    _reformat_(optimizer, theirs, level=logging.DEBUG)
    try:
        yield
    except BaseException:
        for group, formats in zip(optimizer.param_groups, ours):
            group.update(formats)
        optimizer.state.clear()
        raise
    _reformat_(optimizer, ours, level=logging.INFO)


def _reformat_(optimizer: Any, formats: list[dict[str, Any]], level: int) -> None:
    """Give ``optimizer``'s groups ``formats`` and re-encode its live state in them."""
    state_dict = optimizer.state_dict()
    for group, new in zip(optimizer.param_groups, formats):
        group.update(new)
    if state_dict["state"]:
        optimizer.load_state_dict(convert_momentum_(optimizer, state_dict, level))  # already in the new formats


def _convert(name: str, param: Tensor, state: dict[str, Any], old: MomentumFormat | None,
             new: MomentumFormat | None) -> dict[str, Any]:
    expected = check_momentum_state(name, param, old, state)
    for key, shape in expected.items():
        if not torch.is_tensor(state.get(key)) or tuple(state[key].shape) != shape:
            found = list(state[key].shape) if torch.is_tensor(state.get(key)) else None
            raise ValueError(
                f"Cannot convert the saved momentum of {name!r}: {key!r} is {found}, its saved exp_avg_dtype "
                f"keeps {list(shape)}. The checkpoint's param groups do not describe its state."
            )
    local = to_local(param)
    scales = state.get(SCALE_KEY)
    saved = QuantizedMomentum(to_local(state["exp_avg"]).to(local.device), None if scales is None else to_local(scales).to(local.device))
    m = decode(saved, old or MomentumFormat("fp32"), tuple(local.shape))
    fresh = new_momentum(param, new)
    target = QuantizedMomentum(to_local(fresh["exp_avg"]), to_local(fresh[SCALE_KEY]) if SCALE_KEY in fresh else None)
    encode_(target, m, new or MomentumFormat("fp32"))
    return {**{k: v for k, v in state.items() if k not in ("exp_avg", SCALE_KEY)}, **fresh}


def _label(fmt: MomentumFormat | None) -> str:
    return "fp32" if fmt is None else fmt.name if not fmt.quantized else f"{fmt.name} (block {fmt.block})"


def _like(param: Tensor, local: Tensor, global_shape: tuple[int, ...]) -> Tensor:
    """``local`` as a DTensor with ``param``'s mesh and placements (sharded on dim 0 or replicated)."""
    if not isinstance(param, DTensor):
        return local
    stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=global_shape, stride=stride)
