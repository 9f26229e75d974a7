"""``LowMemFSDPStrategy``: FSDP2 data parallelism for Lightning that shards the model by itself.

Lightning's ``FSDPStrategy`` (FSDP1) refuses CPUs and hands optimizers flattened 1-D shards, which
break every block rule of AdamMini and Eve. Its ``ModelParallelStrategy`` runs FSDP2 (``DTensor``
parameters sharded on dim 0, global shapes kept) on CPUs with gloo and GPUs with NCCL, but only if
the user shards the model in ``configure_model``. This subclass adds, for data parallelism only:

* automatic sharding when the model is not sharded after ``configure_model`` (see
  :mod:`lightning_lowmem.strategies.sharding`), with mixed precision, CPU offload and activation
  checkpointing options;
* a check, at save time, that the optimizer state can be checkpointed and resharded (see
  :mod:`lightning_lowmem.strategies.checkpoint`);
* checkpoints that appear under their name only when complete, with checksums checked at load time
  and a clear error for a checkpoint of another model or optimizer (see
  :mod:`~lightning_lowmem.strategies.atomic`, :mod:`~lightning_lowmem.strategies.integrity` and
  :mod:`~lightning_lowmem.strategies.compatibility`);
* a non-finite loss stopped before the optimizer step, on every rank (see
  :mod:`~lightning_lowmem.strategies.loss_guard`);
* clear errors for FSDP1 modules, 0-dim parameters and precision settings FSDP2 cannot run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.optim import Optimizer

from lightning_lowmem.optim.momentum_state import saved_momentum_formats
from lightning_lowmem.strategies.atomic import clean_leftovers, discard, fsync, partial_path, reached
from lightning_lowmem.strategies.checkpoint import check_optimizer_state, parameter_names
from lightning_lowmem.strategies.compatibility import (
    OPTIMIZER_CLASSES_KEY,
    check_resumable,
    optimizer_classes,
    param_groups_of_directory,
    shapes_of_directory,
    shapes_of_file,
    shapes_of_run,
)
from lightning_lowmem.strategies.integrity import (
    LIGHTNING_METADATA,
    MARKER_NAME,
    checkpoint_error,
    checkpoint_problems,
    file_entries,
)
from lightning_lowmem.strategies.loss_guard import LossGuard
from lightning_lowmem.strategies.saving import finish_directory, is_checkpoint_directory, prepare, write_file, written_by
from lightning_lowmem.strategies.sharding import (
    apply_activation_checkpointing,
    auto_shard,
    check_no_fsdp1,
    check_shardable,
    find_blocks,
    is_sharded,
    register_forward_methods,
    reshard,
)
from lightning_lowmem.strategies.timeout import collective_timeout

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

#: Trainer ``precision`` values this strategy runs (as Lightning's ``ModelParallelStrategy``).
SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true", "16-true")

# Marks a module this strategy sharded, so that a later trainer.validate/test does not take it for
# a module the user sharded (and does not shard it twice).
_AUTO_SHARDED = "_lowmem_auto_sharded"


class LowMemFSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over all processes, sharding the model automatically.

    If the model is not sharded after ``LightningModule.configure_model`` (or the module has none),
    every repeated block (each child of an ``nn.ModuleList``, or each instance of ``shard_modules``)
    is sharded with ``fully_shard``, then the root, and ``training_step``/``validation_step``/
    ``test_step``/``predict_step`` are registered as FSDP forward methods (Lightning never calls the
    root's ``forward``). A ``configure_model`` that calls ``fully_shard`` itself is used as is (use
    ``self.device_mesh["data_parallel"]``, a 1-D mesh of all processes); if it sharded the root, its
    step methods are registered the same way.

    Parameters become ``DTensor`` s sharded on dim 0 with their global shapes, so optimizers that
    read shapes (AdamMini, Eve) see the same blocks as on one device. Optimizer state must be
    ``DTensor`` s too (or a 0-dim ``step``) to be checkpointed: other state is refused at save time.
    Gradients are averaged across processes; with ``accumulate_grad_batches`` they are
    reduce-scattered after every micro-batch, which keeps only sharded gradients in memory.
    ``gradient_clip_val`` works as usual (``clip_grad_norm_`` reduces the norm of ``DTensor``
    gradients across ranks); to log the norm use
    :func:`~lightning_lowmem.strategies.sharding.total_grad_norm`, a plain tensor on every rank.

    Registered as ``Trainer(strategy="lowmem_fsdp")`` when :mod:`lightning_lowmem` is imported.

    Args:
        shard_modules: module classes sharded one by one before the root (default: the children of
            every ``nn.ModuleList``). Ignored if ``configure_model`` shards the model.
        mixed_precision: an FSDP2 ``MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32``: bf16 compute and all-gathers, fp32 sharded parameters,
            gradient reductions and optimizer state), or ``None`` for the parameters' own dtype.
        activation_checkpointing: module classes whose forward is recomputed in backward.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (GPU only;
            the optimizer step then runs on the CPU).
        reshard_after_forward: free the blocks' all-gathered parameters after forward (``True``,
            least memory), keep them for backward (``False``, fewer all-gathers), or reshard to
            groups of this many processes (an ``int``).
        save_distributed_checkpoint: ``True``: a checkpoint is a directory of per-rank shards
            (``torch.distributed.checkpoint``), resumable on any number of processes. ``False``:
            one file with the full state gathered on rank 0, in the format of a plain Trainer's
            checkpoint (loadable without this strategy). Either way a checkpoint is written under a
            temporary name beside its path and renamed when complete, and checked when loaded.
        process_group_backend: ``"nccl"``, ``"gloo"``, ... (default: from the device).
        timeout: timeout of the collectives (a ``timedelta`` or seconds); ``None``: the environment
            variable ``LOWMEM_FSDP_TIMEOUT`` (seconds) if set, else 30 minutes.
        nonfinite_loss: what happens before an optimizer step when a loss since the last step was NaN
            or infinite on some rank: ``"raise"`` a ``NonFiniteLossError``, ``"skip"`` the step with a
            warning, or ``"ignore"`` (no check). Decided the same way on every rank.

    Raises:
        TypeError: for a ``mixed_precision`` that is not a ``MixedPrecisionPolicy``, or
            ``shard_modules``/``activation_checkpointing`` that are not module classes.
        ValueError: for an invalid ``reshard_after_forward``, ``timeout`` or ``nonfinite_loss``.

    Example::

        >>> import lightning_lowmem
        >>> trainer = Trainer(accelerator="gpu", devices=8, strategy="lowmem_fsdp")
        >>> strategy = LowMemFSDPStrategy(
        ...     mixed_precision=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        ...     activation_checkpointing=[Block],
        ...     save_distributed_checkpoint=False,
        ... )
        >>> trainer = Trainer(accelerator="gpu", devices=8, num_nodes=2, strategy=strategy)
    """

    strategy_name = "lowmem_fsdp"

    def __init__(
        self,
        shard_modules: Sequence[type[nn.Module]] | None = None,
        mixed_precision: MixedPrecisionPolicy | None = None,
        activation_checkpointing: Sequence[type[nn.Module]] | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool | int = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | float | None = None,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=collective_timeout(timeout),
        )
        self.loss_guard = LossGuard(nonfinite_loss)
        if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecisionPolicy):
            raise TypeError(
                "mixed_precision must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, "
                f"got {mixed_precision!r}. "
                "For bf16 compute with fp32 weights and optimizer state use "
                "MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), "
                "or Trainer(precision='bf16-mixed') for autocast."
            )
        if not isinstance(cpu_offload, bool):
            raise TypeError(f"cpu_offload must be a bool, got {cpu_offload!r}.")
        if isinstance(reshard_after_forward, bool) or reshard_after_forward is None:
            pass
        elif not (isinstance(reshard_after_forward, int) and reshard_after_forward > 1):
            raise ValueError(
                "reshard_after_forward must be True, False or a number of processes > 1, "
                f"got {reshard_after_forward!r}."
            )
        self.shard_modules = _module_classes("shard_modules", shard_modules)
        self.activation_checkpointing = _module_classes("activation_checkpointing", activation_checkpointing)
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="FSDP2 data parallelism with automatic sharding, for lightning_lowmem optimizers",
            override=True,
        )

    # ---- precision -----------------------------------------------------------------------------

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, precision_plugin: Precision | None) -> None:
        if precision_plugin is not None:
            _check_precision(precision_plugin)
        self._precision_plugin = precision_plugin

    # ---- setup ---------------------------------------------------------------------------------

    def setup_environment(self) -> None:
        # Data parallel over every process: a (world, 1) mesh. Lightning's "auto" would make it
        # (nodes, processes per node), i.e. tensor parallelism inside a node.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)

        if self.cpu_offload and self.root_device.type == "cpu":
            raise ValueError(
                "LowMemFSDPStrategy(cpu_offload=True) needs a GPU: with accelerator='cpu' everything is in CPU "
                "memory already. Remove cpu_offload=True."
            )
        check_no_fsdp1(self.model)
        if getattr(self.model, _AUTO_SHARDED, False):
            pass  # sharded by an earlier fit/validate/test of this trainer
        elif is_sharded(self.model):
            self._check_no_auto_options()
            # Lightning calls training_step & co., not forward: without this, parameters of a root
            # the user sharded stay sharded in a step that does not go through self(...).
            register_forward_methods(self.model)
            _materialize_distributed_module(self.model, self._state_device)
            self.model = self.precision_plugin.convert_module(self.model)
        else:
            self._auto_shard()
        if not self.cpu_offload:
            self.model_to_device()  # whatever the user's sharding left out

        self.barrier()

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.cpu_offload:
            _optimizers_to_device(self.optimizers, self.root_device)

    @property
    def _state_device(self) -> torch.device:
        return torch.device("cpu") if self.cpu_offload else self.root_device

    def _auto_shard(self) -> None:
        model = self.model
        check_shardable(model)
        blocks = find_blocks(model, self.shard_modules)
        if self.shard_modules is not None and not blocks:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"LowMemFSDPStrategy(shard_modules={[c.__name__ for c in self.shard_modules]}) found no such module "
                f"with parameters in {_user_class(model).__name__}. Its module classes are: {', '.join(present)}."
            )
        if not blocks:
            log.warning(
                "LowMemFSDPStrategy found no nn.ModuleList in %s: the whole model is one shard unit, all-gathered "
                "at once. Name the repeated blocks with LowMemFSDPStrategy(shard_modules=[...]) to save memory.",
                _user_class(model).__name__,
            )
        if self.activation_checkpointing:
            done = apply_activation_checkpointing(model, self.activation_checkpointing)
            log.info("Activation checkpointing on %d modules.", len(done))
        # Convert dtypes before sharding (cheaper than converting shards afterwards).
        model = self.precision_plugin.convert_module(model)
        auto_shard(
            model,
            self.device_mesh["data_parallel"],
            blocks=blocks,
            mp_policy=self.mixed_precision,
            cpu_offload=self.cpu_offload,
            reshard_after_forward=self.reshard_after_forward,
        )
        setattr(model, _AUTO_SHARDED, True)
        _materialize_distributed_module(model, self._state_device)
        self.model = model

    def _check_no_auto_options(self) -> None:
        given = [
            name
            for name, value, default in (
                ("shard_modules", self.shard_modules, None),
                ("mixed_precision", self.mixed_precision, None),
                ("activation_checkpointing", self.activation_checkpointing, None),
                ("cpu_offload", self.cpu_offload, False),
                ("reshard_after_forward", self.reshard_after_forward, True),
            )
            if value != default
        ]
        if given:
            raise ValueError(
                f"LowMemFSDPStrategy({', '.join(given)}=...) applies to automatic sharding, but "
                f"{_user_class(self.lightning_module).__name__}.configure_model already shards the model. Pass these "
                "settings to your own fully_shard calls, or remove the fully_shard calls from configure_model."
            )

    def model_to_device(self) -> None:
        assert self.model is not None
        if not self.cpu_offload:
            self.model.to(self.root_device)

    # ---- checkpoints ---------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        reshard(self.model)  # after an eval forward the root may still hold all-gathered parameters
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's state dict (sharded, or full on rank 0), refused if it would be saved wrong.

        Raises:
            ValueError: if a sharded parameter's state holds a plain tensor or a ``Partial`` DTensor
                (see :func:`~lightning_lowmem.strategies.checkpoint.check_optimizer_state`).
        """
        assert self.model is not None
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        check_optimizer_state(inner, parameter_names(self.model))
        reshard(self.model)
        return super().optimizer_state(optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the checkpoint under a temporary name beside ``filepath``, then rename it when complete.

        A sharded checkpoint (directory) gets a completion marker, written last, with the size and
        CRC32 of every file; every rank reports its files before the rename. A single file is
        written by rank 0 and flushed to disk before the rename. A previous checkpoint at
        ``filepath`` stays whole until the new one replaces it; what a killed save left beside it
        is removed first.

        Raises:
            IsADirectoryError: if ``filepath`` is a directory that is not a checkpoint.
            RuntimeError: on every rank, if writing failed on one of them (naming the rank and the error).
        """
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported: it writes "
                "local files itself, without a CheckpointIO."
            )
        path = Path(self.broadcast(str(filepath)))
        if path.is_dir() and not is_checkpoint_directory(path):
            raise IsADirectoryError(
                f"Cannot save a checkpoint to {str(path)!r}: it is a directory that is not a checkpoint (no "
                f"{MARKER_NAME} or {LIGHTNING_METADATA} in it). Give the path of the checkpoint itself, e.g. "
                f"{str(path / 'last.ckpt')!r}."
            )
        checkpoint[OPTIMIZER_CLASSES_KEY] = optimizer_classes(self.optimizers)
        error = None
        if self.is_global_zero:
            error = _attempt(lambda: prepare(path, directory=self._save_distributed_checkpoint))
        self._agree(self.broadcast(error), path)
        if self._save_distributed_checkpoint:
            self._save_directory(checkpoint, path)
        else:
            self._save_file(checkpoint, path)

    def _save_directory(self, checkpoint: dict[str, Any], path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        partial = partial_path(path)
        reached("started", path)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        dcp.save(shards, checkpoint_id=partial)
        entries: dict[str, Any] = {}

        def write_and_sum() -> None:
            if self.is_global_zero:
                torch.save(checkpoint, partial / LIGHTNING_METADATA)
                fsync(partial / LIGHTNING_METADATA)
            entries.update(file_entries(partial, written_by(partial, self.global_rank)))

        error = _attempt(write_and_sum)
        reached("written", path)
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(reports, (self.global_rank, error, entries))
        errors = [f"rank {rank}: {err}" for rank, err, _ in reports if err]
        self._agree("; ".join(errors) or None, path)
        if self.is_global_zero:
            files = {name: entry for _, _, rank_entries in reports for name, entry in rank_entries.items()}
            error = _attempt(lambda: finish_directory(partial, path, files))
        self._agree(self.broadcast(error), path)

    def _save_file(self, checkpoint: dict[str, Any], path: Path) -> None:
        error = None
        if self.is_global_zero:
            error = _attempt(lambda: write_file(checkpoint, path))
        self._agree(self.broadcast(error), path)

    def _agree(self, error: str | None, path: Path) -> None:
        """Raise on every rank if ``error`` (the same on all ranks) says the save failed."""
        if error is None:
            return
        if self.is_global_zero:
            _attempt(lambda: clean_leftovers(path))
        raise RuntimeError(f"Saving the checkpoint {str(path)!r} failed: {error}. The previous one, if any, is unchanged.")

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete a checkpoint (rank 0): renamed aside first, so an interrupted deletion leaves no half checkpoint."""
        if self.is_global_zero:
            discard(Path(filepath))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Check the checkpoint (complete, intact, fits the model and optimizers), then load it.

        AdamMini/Eve momentum saved in another ``exp_avg_dtype`` is read in its saved format and
        converted to the run's (:func:`~lightning_lowmem.optim.momentum_state.saved_momentum_formats`).

        Raises:
            CheckpointError: on every rank, naming the path and what is missing, damaged or different.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        problems: list[Any] = [None] * self.world_size
        dist.all_gather_object(problems, checkpoint_problems(path, self.global_rank, self.world_size))
        found = [p for rank_problems in problems for p in rank_problems]
        if found:
            raise checkpoint_error(path, list(dict.fromkeys(found)))
        assert self.model is not None
        checkpoint = None if path.is_dir() else torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        if checkpoint is None:
            saved_groups = param_groups_of_directory(path)
        else:
            saved_groups = [state.get("param_groups") for state in checkpoint.get("optimizer_states", [])]
        with contextlib.ExitStack() as formats:
            # an AdamMini/Eve momentum saved in another exp_avg_dtype is read as saved, then converted
            for optimizer, groups in zip(self.optimizers, saved_groups):
                formats.enter_context(saved_momentum_formats(getattr(optimizer, "_optimizer", optimizer), groups))
            run = shapes_of_run(self.model, self.optimizers)
            saved = shapes_of_directory(path, list(run.weights)) if checkpoint is None else shapes_of_file(checkpoint, self.model)
            check_resumable(path, saved, run)
            return super().load_checkpoint(path, weights_only=weights_only)

    # ---- non-finite loss -----------------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        self.loss_guard.record(output)
        return output

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """The optimizer step, not taken (an error, or a skip) if a loss since the last one was not finite."""
        if not self.loss_guard.enabled or self._callback_handles_nonfinite_loss():
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer

        def guarded() -> Any:
            result = closure()
            params = [p for group in inner.param_groups for p in group["params"]]
            step = self.lightning_module.trainer.global_step if self.lightning_module is not None else -1
            self.loss_guard.check(params, step, lambda bad: self.reduce_boolean_decision(bad, all=False))
            return result

        return super().optimizer_step(optimizer, guarded, model, **kwargs)

    def _callback_handles_nonfinite_loss(self) -> bool:
        """Whether a callback takes the decision on non-finite losses itself (its
        ``handles_nonfinite_loss`` is true, as :class:`~lightning_lowmem.callbacks.LossSpikeMonitor`'s
        is by default): it then sees the step, which the guard would otherwise stop before the
        callbacks' ``on_before_optimizer_step``."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return trainer is not None and any(getattr(cb, "handles_nonfinite_loss", False) for cb in trainer.callbacks)


def _attempt(fn: Callable[[], None]) -> str | None:
    """Run ``fn``; its error as text (for the other ranks), or ``None``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised on every rank
        log.exception("Checkpoint step failed")
        return f"{type(e).__name__}: {e}"
    return None


def _user_class(module: nn.Module) -> type:
    """The module's own class (``fully_shard`` swaps it for a generated ``FSDP<Name>`` subclass)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _check_precision(plugin: Precision) -> None:
    supported = (
        type(plugin) is Precision
        or isinstance(plugin, HalfPrecision)
        or (isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed" and plugin.scaler is None)
    )
    if not supported:
        flag = getattr(plugin, "precision", type(plugin).__name__)
        hint = (
            " fp16 autocast needs a GradScaler, which does not handle DTensor gradients; use 'bf16-mixed', or "
            "LowMemFSDPStrategy(mixed_precision=MixedPrecisionPolicy(param_dtype=torch.float16, "
            "reduce_dtype=torch.float32))."
            if flag == "16-mixed"
            else ""
        )
        raise ValueError(
            f"LowMemFSDPStrategy does not support Trainer(precision={flag!r}) ({type(plugin).__name__}). "
            f"Choose one of {', '.join(map(repr, SUPPORTED_PRECISION))}.{hint}"
        )


def _module_classes(arg: str, classes: Any) -> tuple[type[nn.Module], ...] | None:
    if classes is None:
        return None
    if isinstance(classes, type):
        classes = (classes,)
    classes = tuple(classes)
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
    if bad or not classes:
        raise TypeError(f"{arg} must be a non-empty list of nn.Module subclasses, got {classes!r}.")
    return classes
