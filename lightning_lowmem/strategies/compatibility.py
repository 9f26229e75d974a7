"""Does a checkpoint fit the run that resumes it? Shapes and optimizer classes compared before loading.

Loading another optimizer's state, or a model of another width, fails deep inside
``torch.distributed.checkpoint`` ("The size of tensor a (3) must match the size of tensor b (24)")
or, worse, loads. :func:`check_resumable` compares what the checkpoint holds (the shards' index
``.metadata`` of a directory, or the state dict of a file: global shapes, nothing else is read)
with the model and optimizers of the run, and names the first difference:

* a parameter of another shape;
* another optimizer class (recorded at save time under :data:`OPTIMIZER_CLASSES_KEY`), or, for a
  checkpoint without that record, other state keys;
* optimizer state of other shapes (another preset, partition rule or setting of the same class).

:func:`load_weights` is the way out the messages give: the weights of a checkpoint, without its
optimizer state, into a model before ``trainer.fit``.

Example::

    >>> load_weights(model, "ckpts/last.ckpt")
    >>> trainer.fit(model)   # no ckpt_path: a fresh optimizer and a fresh step count
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_lowmem.strategies.integrity import LIGHTNING_METADATA, CheckpointError, verify_checkpoint

#: Checkpoint key holding the class names of the optimizers whose state it stores.
OPTIMIZER_CLASSES_KEY = "lowmem_optimizer_classes"

Shape = tuple[int, ...]


@dataclass
class CheckpointShapes:
    """The shapes a checkpoint holds (or a run expects): weights, and each optimizer's state per parameter."""

    weights: dict[str, Shape]
    optimizer_states: list[dict[str, dict[str, Shape]]]
    optimizer_classes: list[str] | None = field(default=None)


def optimizer_classes(optimizers: Sequence[Optimizer]) -> list[str]:
    """The class names stored under :data:`OPTIMIZER_CLASSES_KEY` at save time."""
    return [type(getattr(o, "_optimizer", o)).__name__ for o in optimizers]


def shapes_of_directory(path: Path, live_names: Sequence[str]) -> CheckpointShapes:
    """What a sharded checkpoint holds, from its ``.metadata`` and ``meta.pt`` (no shard is read).

    ``live_names`` are the run's parameter names: a parameter's state keys are found under them.
    """
    from torch.distributed.checkpoint import FileSystemReader

    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sizes = {key: tuple(md.size) for key, md in entries.items() if hasattr(md, "size")}
    weights = {key[len("state_dict.") :]: shape for key, shape in sizes.items() if key.startswith("state_dict.")}
    states = []
    for i in range(len({key.split(".", 1)[0] for key in sizes if key.startswith("optimizer_")})):
        prefix = f"optimizer_{i}.state."
        per_param: dict[str, dict[str, Shape]] = {}
        for name in live_names:
            keyed = f"{prefix}{name}."
            found = {key[len(keyed) :]: shape for key, shape in sizes.items() if key.startswith(keyed)}
            if found:
                per_param[name] = found
        states.append(per_param)
    meta = torch.load(path / LIGHTNING_METADATA, map_location="cpu", weights_only=False)
    return CheckpointShapes(weights, states, meta.get(OPTIMIZER_CLASSES_KEY))


def param_groups_of_directory(path: Path) -> list[list[dict[str, Any]]]:
    """Each optimizer's saved param groups (hyperparameters, no tensors) in a sharded checkpoint.

    ``torch.distributed.checkpoint`` stores them as small pickled entries
    ``optimizer_<i>.param_groups.<j>.<key>``; only those are read, by this process alone.
    """
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    entries = reader.read_metadata().state_dict_metadata
    found = {key: None for key, md in entries.items() if ".param_groups." in key and not hasattr(md, "size")}
    if not found:
        return []
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(found, storage_reader=reader, no_dist=True)
    optimizers: dict[int, dict[int, dict[str, Any]]] = {}
    for key, value in found.items():
        optimizer, _, group, name = key.split(".", 3)
        optimizers.setdefault(int(optimizer.removeprefix("optimizer_")), {}).setdefault(int(group), {})[name] = value
    return [[groups[j] for j in sorted(groups)] for _, groups in sorted(optimizers.items())]


def shapes_of_file(checkpoint: dict[str, Any], module: nn.Module) -> CheckpointShapes:
    """What a single-file (full) checkpoint holds; its optimizer state keyed by position, named like ``module``."""
    names = [name for name, _ in module.named_parameters()]
    states = []
    for optimizer_state in checkpoint.get("optimizer_states", []):
        ids = [i for group in optimizer_state.get("param_groups", []) for i in group["params"]]
        by_name = {
            (names[i] if isinstance(i, int) and i < len(names) else str(i)): {
                key: tuple(value.shape) for key, value in optimizer_state.get("state", {}).get(i, {}).items()
                if torch.is_tensor(value)
            }
            for i in ids
        }
        states.append({name: shapes for name, shapes in by_name.items() if shapes})
    weights = {key: tuple(value.shape) for key, value in checkpoint.get("state_dict", {}).items() if torch.is_tensor(value)}
    return CheckpointShapes(weights, states, checkpoint.get(OPTIMIZER_CLASSES_KEY))


def shapes_of_run(module: nn.Module, optimizers: Sequence[Optimizer]) -> CheckpointShapes:
    """What the run's model and optimizers would save (global shapes; may initialise empty optimizer state)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = {name: tuple(value.shape) for name, value in module.state_dict().items() if torch.is_tensor(value)}
    states = []
    for optimizer in optimizers:
        state = get_optimizer_state_dict(module, getattr(optimizer, "_optimizer", optimizer))["state"]
        states.append(
            {name: {key: tuple(v.shape) for key, v in s.items() if torch.is_tensor(v)} for name, s in state.items()}
        )
    return CheckpointShapes(weights, states, optimizer_classes(optimizers))


def check_resumable(path: Path, saved: CheckpointShapes, run: CheckpointShapes) -> None:
    """Raise :class:`CheckpointError` if the checkpoint ``path`` (holding ``saved``) does not fit the ``run``.

    Raises:
        CheckpointError: naming the first parameter or optimizer that differs, both shapes or classes,
            and how to load the weights only where that is a way out.
    """
    where = f"Cannot resume from {str(path)!r}"
    for name, shape in run.weights.items():
        if name in saved.weights and saved.weights[name] != shape:
            raise CheckpointError(
                f"{where}: parameter {name!r} has shape {list(saved.weights[name])} in the checkpoint and {list(shape)} "
                "in the model. Build the model with the configuration the checkpoint was written with."
            )
    if not run.optimizer_states:
        return  # validate/test/predict: only the weights are loaded
    if len(saved.optimizer_states) != len(run.optimizer_states):
        raise CheckpointError(
            f"{where}: it holds the state of {len(saved.optimizer_states)} optimizer(s), the run has "
            f"{len(run.optimizer_states)}. {_weights_only(path)}"
        )
    run_classes = run.optimizer_classes or ["?"] * len(run.optimizer_states)
    for i, (saved_state, run_state, run_class) in enumerate(zip(saved.optimizer_states, run.optimizer_states, run_classes)):
        saved_class = saved.optimizer_classes[i] if saved.optimizer_classes else None
        if saved_class is not None and saved_class != run_class:
            raise CheckpointError(
                f"{where}: this checkpoint holds {saved_class} state; the run uses {run_class}. Resume with "
                f"{saved_class}, or {_weights_only(path)}"
            )
        for name, run_shapes in run_state.items():
            saved_shapes = saved_state.get(name)
            if saved_shapes is None:
                continue  # a parameter without state yet (never stepped): nothing to compare
            if saved_shapes.keys() != run_shapes.keys():
                raise CheckpointError(
                    f"{where}: the optimizer state of {name!r} has the keys {sorted(saved_shapes)} in the checkpoint, "
                    f"the run's {run_class} keeps {sorted(run_shapes)}: the checkpoint was written by another optimizer. "
                    f"Resume with that optimizer, or {_weights_only(path)}"
                )
            for key, shape in run_shapes.items():
                if saved_shapes[key] != shape:
                    raise CheckpointError(
                        f"{where}: {run_class} state {key!r} of {name!r} has shape {list(saved_shapes[key])} in the "
                        f"checkpoint and {list(shape)} in the run: it was written with another preset, partition rule "
                        f"or setting of {run_class}. Use the settings it was written with, or {_weights_only(path)}"
                    )


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load only the weights of the checkpoint ``path`` (either format) into the unsharded ``model``.

    Checks the checkpoint first (:func:`~lightning_lowmem.strategies.integrity.verify_checkpoint`).
    Call it before ``trainer.fit(model)`` without ``ckpt_path``: the optimizer, step count and loops
    start afresh. On several processes every process must call it. A single-file checkpoint is
    unpickled: load only checkpoints you trust.

    Raises:
        CheckpointError: if the checkpoint is incomplete or damaged.

    Example::

        >>> model = GPT(config)
        >>> load_weights(model, "ckpts/epoch=3-step=400.ckpt")
        >>> Trainer(strategy="lowmem_fsdp", ...).fit(model)
    """
    path = Path(path)
    verify_checkpoint(path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"state_dict": model.state_dict()}
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state["state_dict"])
    else:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])


def _weights_only(path: Path) -> str:
    return (
        "to start from its weights with a new optimizer, call "
        f"`lightning_lowmem.strategies.load_weights(model, {str(path)!r})` and then `trainer.fit(model)` without "
        "ckpt_path."
    )
