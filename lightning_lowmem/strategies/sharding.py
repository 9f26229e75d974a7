"""Automatic FSDP2 sharding of a model: which modules become shard units, checks, and gradient norms.

``fully_shard`` must be applied bottom-up: each call groups the parameters of a module that no
earlier call on a submodule took. :func:`auto_shard` shards every *repeated block* (each child of
an ``nn.ModuleList``, or each instance of the classes the user names) and then the root, whose
group holds what is left (embeddings, final norm, output head).

Lightning never calls the root's ``forward``: it calls ``training_step`` and friends. FSDP2 only
all-gathers around ``forward``, so those methods are registered as forward methods
(``register_fsdp_forward_method``) or the root's own parameters would stay sharded inside them.

Example::

    >>> blocks = find_blocks(model)                       # [("layers.0", Block), ("layers.1", Block)]
    >>> auto_shard(model, mesh["data_parallel"], blocks=blocks)
    >>> norm = total_grad_norm(model.parameters())        # a plain tensor, the same on every rank
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

#: LightningModule methods Lightning calls instead of ``forward``; each all-gathers the root's parameters.
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def find_blocks(
    model: nn.Module, shard_modules: Sequence[type[nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules to shard one by one before the root, deepest first (the order ``fully_shard`` needs).

    Args:
        model: the root module (never returned itself).
        shard_modules: module classes to shard; if ``None``, every child of every ``nn.ModuleList``.

    Modules without trainable or untrainable parameters are skipped (nothing to shard).
    """
    if shard_modules is not None:
        classes = tuple(shard_modules)
        picked = [(name, m) for name, m in model.named_modules() if name and isinstance(m, classes)]
    else:
        picked = []
        for name, m in model.named_modules():
            if isinstance(m, nn.ModuleList):
                prefix = f"{name}." if name else ""
                picked += [(prefix + child_name, child) for child_name, child in m.named_children()]
    # named_modules() is pre-order: a descendant always comes after its ancestors, so the reverse
    # puts every module before its ancestors.
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    picked.sort(key=lambda item: order[id(item[1])], reverse=True)
    seen: set[int] = set()
    blocks = []
    for name, m in picked:
        if id(m) in seen or next(m.parameters(), None) is None:
            continue
        seen.add(id(m))
        blocks.append((name, m))
    return blocks


def check_shardable(model: nn.Module) -> None:
    """Raise if ``model`` holds something FSDP2 cannot shard.

    Raises:
        TypeError: for modules wrapped with FSDP1 (``FullyShardedDataParallel``), naming them.
        ValueError: for 0-dim parameters (``fully_shard`` shards dim 0), naming them.
    """
    check_no_fsdp1(model)
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(
            f"FSDP2 cannot shard 0-dim parameters, found {len(scalars)}: {', '.join(map(repr, scalars[:8]))}"
            f"{' ...' if len(scalars) > 8 else ''}. Make each a 1-element tensor, e.g. "
            "`nn.Parameter(torch.tensor([value]))` instead of `nn.Parameter(torch.tensor(value))`."
        )


def check_no_fsdp1(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the modules wrapped with FSDP1's ``FullyShardedDataParallel``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = [name or "<root>" for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    if wrapped:
        raise TypeError(
            f"Found modules wrapped with FSDP1 `torch.distributed.fsdp.FullyShardedDataParallel`: {wrapped[:8]}. "
            "LowMemFSDPStrategy uses FSDP2: remove the wrapper and let the strategy shard the model, or call "
            "`torch.distributed.fsdp.fully_shard` in `configure_model`."
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` was sharded with FSDP2 or any parameter is a ``DTensor``."""
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


def apply_activation_checkpointing(model: nn.Module, classes: Sequence[type[nn.Module]]) -> list[str]:
    """Recompute the forward of every instance of ``classes`` in backward; returns their names.

    The module's ``forward`` is replaced on the instance by a non-reentrant
    ``torch.utils.checkpoint.checkpoint`` of it, so parameter names (and so checkpoints and block
    plans) do not change, and FSDP2's hooks, which run around ``__call__``, stay outside the
    recomputed region: the parameters are all-gathered before the recomputation needs them.
    Nested instances are checkpointed once (the outermost); the root is never checkpointed.
    """
    classes = tuple(classes)
    done: list[str] = []
    for name, m in model.named_modules():
        if not name or not isinstance(m, classes) or any(name.startswith(prefix + ".") for prefix in done):
            continue
        forward = m.forward
        m.forward = functools.partial(_checkpointed, forward)  # type: ignore[method-assign]
        done.append(name)
    return done


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def auto_shard(
    model: nn.Module,
    mesh: Any,
    *,
    blocks: Sequence[tuple[str, nn.Module]],
    mp_policy: MixedPrecisionPolicy | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool | int = True,
    forward_methods: Iterable[str] = STEP_METHODS,
) -> None:
    """``fully_shard`` each block, then the root, and register the root's ``forward_methods``.

    Args:
        model: the root module; becomes an ``FSDPModule`` in place.
        mesh: a 1-D data-parallel ``DeviceMesh`` (a 2-D one would mean HSDP to ``fully_shard``).
        blocks: from :func:`find_blocks`, deepest first.
        mp_policy: FSDP2's mixed precision policy (``None``: parameters' own dtype throughout).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.
        reshard_after_forward: for the blocks; the root keeps FSDP2's default (not resharded, as
            backward needs it first).
        forward_methods: methods of the root that run like ``forward``.
    """
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    }
    for _, block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    register_forward_methods(model, forward_methods)
    log.info("FSDP2: sharded %d blocks and the root over %d ranks.", len(blocks), mesh.size())


def register_forward_methods(model: nn.Module, methods: Iterable[str] = STEP_METHODS) -> None:
    """Make ``methods`` of an FSDP2 root all-gather its parameters like ``forward`` does.

    A no-op for a module that is not an ``FSDPModule``, for methods it lacks, and for methods already
    registered (``register_fsdp_forward_method`` wraps with ``functools.wraps``: ``__wrapped__``).
    """
    if not isinstance(model, FSDPModule):
        return
    for method in methods:
        bound = getattr(model, method, None)
        if bound is not None and getattr(bound, "__wrapped__", None) is None:
            register_fsdp_forward_method(model, method)


def reshard(model: nn.Module) -> None:
    """Free every all-gathered parameter of ``model`` so that only the shards are registered."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---- gradient norms ----------------------------------------------------------------------------


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients together, as a plain tensor equal on every rank.

    With ``DTensor`` gradients ``torch.nn.utils.get_total_norm`` returns a ``DTensor`` (partial
    norms on each rank); ``full_tensor()`` reduces it across the mesh. Gradients on different
    meshes, and plain ones, are normed separately and combined.
    """
    groups: dict[int | None, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = id(p.grad.device_mesh) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    if not groups:
        return torch.tensor(0.0)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return norms[0] if len(norms) == 1 else torch.nn.utils.get_total_norm(norms, norm_type=norm_type)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm``; returns the norm before.

    Like ``torch.nn.utils.clip_grad_norm_`` with the norm reduced across ranks for ``DTensor``
    gradients (see :func:`total_grad_norm`).
    """
    parameters = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(parameters, norm_type)
    if parameters:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
