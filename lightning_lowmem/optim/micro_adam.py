r"""``MicroAdam``: Adam over a window of compressed gradients, with compressed error feedback.

The math lives in :mod:`lightning_lowmem.kernels.micro_adam`; this class holds the state,
which for a parameter sharded by FSDP2 is a set of ``Shard(0)`` DTensors of its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_lowmem.kernels import RowLayout, check_backend, state_dtype
from lightning_lowmem.optim.base import LowMemOptimizer, ParamsLike, check_torch_options
from lightning_lowmem.optim.functional import block_adam
from lightning_lowmem.optim.hparams import check_adam_hparams
from lightning_lowmem.kernels.micro_adam_layout import (
    DEFAULT_BLOCK_SIZE,
    ERROR_STATE,
    STATE_DTYPES,
    MicroAdamLayout,
    check_micro_adam_hparams,
    init_state,
    micro_adam_layout,
)
from lightning_lowmem.optim.micro_adam_functional import micro_adam
from lightning_lowmem.optim.sharding import ParamSharding, to_local

#: State keys of a compressed parameter, in :func:`init_state`'s order, with their dtypes.
COMPRESSED_STATE = STATE_DTYPES
#: State keys of a parameter that is not compressed (plain AdamW).
DENSE_STATE = ("exp_avg", "exp_avg_sq")
#: Group settings that decide the state's layout: a checkpoint must have been written with the same.
LAYOUT_SETTINGS = ("window", "density", "block_size", "quant_bucket", "min_compressed_numel", "error_feedback")


class MicroAdam(LowMemOptimizer):
    r"""MicroAdam (Modoranu et al., 2024): Adam whose state is a window of sparse gradients.

    Each parameter of two or more dims is viewed as rows (dim 0) of :math:`c` coordinates (the
    other dims flattened); each row is cut into :math:`\lceil c / \text{block\_size} \rceil`
    blocks of near-equal length. At step :math:`t`, with the gradient :math:`g_t`:

    .. math::

        a &= g_t + \mathrm{deq}(e)
            && \text{gradient plus the 4-bit error feedback}\\
        I &= \textstyle\bigcup_b \operatorname{top-k}_{i\in b} |a_i|,\quad
            (I, a_I) \to \text{ring slot } (t-1) \bmod m
            && \text{k per block, int16 indices, bf16 values}\\
        e &= Q_4(a \text{ with } a_I = 0)
            && \text{per bucket: } \lfloor (a-\min)/\tfrac{\max-\min}{15} + \tfrac12 \rceil\\
        \theta &\leftarrow \theta (1 - \eta\lambda)
            && \text{decoupled weight decay}\\
        M &= \textstyle\sum_{j<\min(t,m)} \beta_1^j V_{t-j},\quad S = \sum_{j<\min(t,m)} \beta_2^j V_{t-j}^2
            && \text{rebuilt from the window}\\
        \theta &\leftarrow \theta - \eta\,\frac{c_1 M}{\sqrt{c_2 S} + \epsilon},\quad
            c_1 = \tfrac{1-\beta_1}{1-\beta_1^t},\ c_2 = \tfrac{1-\beta_2}{1-\beta_2^t}

    So at :math:`t = 1` the update is :math:`\mathrm{sign}(g)` on the :math:`k` selected
    coordinates of each block and 0 elsewhere (exactly, when :math:`\epsilon = 0` or
    :math:`\epsilon < |g_i|\,2^{-25}`); with a window of identical gradients it equals AdamW's.

    **Block layout, and why.** Top-k blocks and quantisation buckets are *row-aligned*: a row of
    :math:`c` coordinates has :math:`n = \lceil c/\text{block\_size}\rceil` blocks of
    :math:`\lceil c/n \rceil` coordinates (the last holds the rest) with
    :math:`k = \max(1, \lceil \text{density}\cdot\text{length}\rceil)` kept per block, and
    buckets of ``quant_bucket`` coordinates (the row's last bucket may be shorter); nothing crosses
    a row. FSDP2 shards parameters on dim 0 in whole rows (``torch.chunk``), so each rank holds
    whole blocks and buckets: it updates its rows alone (no communication, and per row the same
    computation as one process), and every state tensor has the rows as its dim 0, stored as a ``Shard(0)``
    DTensor with the same global shape on any number of ranks. A checkpoint written on 2 ranks
    therefore resumes on 1 or 4. ``block_size`` does not depend on the device either. A row
    shorter than ``1 / density`` still keeps one coordinate per step, so very narrow weights
    (fewer than about 100 columns) cost more than 1 byte per parameter.

    State per compressed parameter (``step`` aside), rows :math:`R`, ring of :math:`m`, :math:`K`
    entries per row: ``window`` int32 ``[R, m, K]`` (each entry an int16 index relative to its
    block in the low half and the bf16 value in the high half: gloo and NCCL cannot gather
    int16), ``error`` uint8 ``[R, ceil(c/2)]`` (two 4-bit codes per byte), ``error_min``/``error_max``
    bf16 ``[R, ceil(c/bucket)]``: about :math:`0.5 + 4/\text{bucket} + 4m\,\text{density}` bytes
    per parameter (0.97 to 0.98 for GPT-2 small's matrices at the defaults, 8 for fp32 AdamW);
    with ``error_feedback=False`` only ``window``, about :math:`4m\,\text{density}` (0.40 to 0.42).
    One-dimensional parameters and those with fewer than ``min_compressed_numel`` elements (by
    default one block, 4096: biases, norms) keep AdamW's ``exp_avg``/``exp_avg_sq`` (DTensors like
    the parameter under FSDP2) and are updated by the same functional core as AdamW
    (:func:`lightning_lowmem.kernels.block_adam.block_adam_update_`): a 1-D tensor has no rows to
    align blocks to, and such tensors are a tiny fraction of a transformer (0.1% of GPT-2 small).
    :meth:`compressed_names` and :meth:`summary` say which parameters are compressed.

    Args:
        params: a model, ``model.named_parameters()``, tensors, or param-group dicts.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`, added to :math:`\sqrt{c_2 S}`.
        weight_decay: decoupled weight decay :math:`\lambda` (0 by default, as the official code).
        error_feedback: keep the 4-bit error feedback (the paper's MicroAdam). ``False`` gives
            top-k window Adam, :math:`a = g` (no :math:`e`: what top-k drops is lost), and allocates
            no ``error``/``error_min``/``error_max``: :math:`0.5 + 4/\text{bucket}` bytes per
            parameter less.
        window: :math:`m`, sparse gradients kept.
        density: fraction of each block kept, :math:`k = \max(1, \lceil \text{density}\cdot\text{block length}\rceil)`.
        block_size: the most coordinates of one top-k block, at most 32768 (int16 relative
            indices); a row longer than this is cut into blocks of near-equal length. The default
            4096 does not depend on the device, so checkpoints move between devices.
        quant_bucket: coordinates per min/max bucket of the error feedback (even).
        min_compressed_numel: parameters with fewer elements keep AdamW state; ``None`` means
            ``block_size``.
        maximize: maximize the objective instead of minimizing it.
        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else ``torch.compile`` where
            supported, else eager), ``"torch"``, ``"compile"``, ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"native"`` (the C kernel for the dense fp32 CPU tensors, the
            compressed ones compiled); see :func:`lightning_lowmem.kernels.resolve`.
        **torch_options: ``torch.optim.AdamW``'s ``foreach``, ``fused``, ``capturable`` and
            ``differentiable`` are accepted as ``None``/``False`` only; a true value raises a
            ``ValueError`` that says what ``backend`` does instead.

    Raises:
        ValueError: for a hyperparameter out of range, naming it, a torch implementation switch
            (``fused=True``, ...), or a DTensor parameter that is not sharded on dim 0 of a 1-D mesh
            (or replicated).

    Example::

        >>> optimizer = MicroAdam(model, lr=1e-4, window=10, density=0.01)
        >>> print(optimizer.summary())
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float | torch.Tensor = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window: int = 10,
        density: float = 0.01,
        block_size: int = DEFAULT_BLOCK_SIZE,
        quant_bucket: int = 64,
        *,
        error_feedback: bool = True,
        min_compressed_numel: int | None = None,
        maximize: bool = False,
        backend: str = "auto",
        **torch_options: Any,
    ) -> None:
        check_torch_options(type(self).__name__, torch_options)
        check_adam_hparams(lr, betas, eps, weight_decay)
        check_micro_adam_hparams(window, density, block_size, quant_bucket)
        _check_error_feedback(error_feedback)
        if min_compressed_numel is None:
            min_compressed_numel = block_size
        if not (isinstance(min_compressed_numel, int) and min_compressed_numel >= 1):
            raise ValueError(f"Invalid min_compressed_numel: {min_compressed_numel!r} (must be an int >= 1).")
        check_backend(backend)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            window=window,
            density=density,
            block_size=block_size,
            quant_bucket=quant_bucket,
            error_feedback=error_feedback,
            min_compressed_numel=min_compressed_numel,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_micro_adam_hparams(group["window"], group["density"], group["block_size"], group["quant_bucket"])
            _check_error_feedback(group["error_feedback"])
            for p in group["params"]:
                ParamSharding.of(p, transposed=False)  # raises for placements other than FSDP2's
        self.backend = backend

    # ---- which parameters are compressed -------------------------------------------------------

    @staticmethod
    def is_compressed(param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param`` gets compressed state under ``group``'s settings: 2+ dims and
        ``min_compressed_numel`` elements (global counts for a DTensor)."""
        return param.dim() >= 2 and param.numel() >= group["min_compressed_numel"]

    @staticmethod
    def layout_of(param: torch.Tensor, group: dict[str, Any]) -> MicroAdamLayout:
        """The row-aligned block/bucket layout of a compressed parameter (its global rows) under ``group``'s settings."""
        rows = param.shape[0]
        return micro_adam_layout(
            rows, param.numel() // rows,
            block_size=group["block_size"], density=group["density"], quant_bucket=group["quant_bucket"],
        )

    def compressed_names(self) -> list[str]:
        """Names of the parameters with compressed state (the others keep AdamW state)."""
        return [name for name, p, group in self.named_params() if self.is_compressed(p, group)]

    def state_bytes(self) -> int:
        """Bytes of optimizer state (of all ranks for sharded parameters): allocated tensors where state
        exists, else what will be allocated."""
        total = 0
        for _, p, group in self.named_params():
            if self.state.get(p):
                total += sum(v.numel() * v.element_size() for v in self.state[p].values() if torch.is_tensor(v))
            else:
                total += self._planned_bytes(p, group)
        return total

    def _planned_bytes(self, param: torch.Tensor, group: dict[str, Any]) -> int:
        step_bytes = 4
        if self.is_compressed(param, group):
            layout = self.layout_of(param, group)
            return layout.state_bytes(group["window"], group["error_feedback"]) + step_bytes
        return param.numel() * (param.element_size() + torch.empty(0, dtype=state_dtype(param)).element_size()) + step_bytes

    def state_segments(self) -> dict[torch.Tensor, list[tuple[str, int, int]]]:
        """``param -> [(kind, parameters, v entries)]``: ``compressed`` (no ``v``), or ``full`` (AdamW's state)."""
        return {
            p: [("compressed", p.numel(), 0)] if self.is_compressed(p, group) else [("full", p.numel(), p.numel())]
            for _, p, group in self.named_params()
        }

    def summary(self) -> str:
        """A table: each parameter, its size, its state kind and blocks per row, its state bytes per element."""
        rows = [("name", "shape", "numel", "state", "blocks/row", "bytes/param")]
        numel = state = 0
        for name, p, group in self.named_params():
            nbytes = self._planned_bytes(p, group)
            if self.is_compressed(p, group):
                layout = self.layout_of(p, group)
                kind, blocks = "compressed", f"{layout.blocks_per_row} x <={layout.block_len}"
            else:
                kind, blocks = "adamw", "-"
            rows.append((name, str(list(p.shape)), str(p.numel()), kind, blocks, f"{nbytes / p.numel():.3f}"))
            numel += p.numel()
            state += nbytes
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        compressed = sum(p.numel() for _, p, g in self.named_params() if self.is_compressed(p, g))
        lines.append(
            f"{numel} parameters, {compressed / numel:.1%} compressed; state {state} bytes = "
            f"{state / numel:.3f} bytes/param (fp32 AdamW: 8.000)"
        )
        return "\n".join(lines)

    # ---- state ---------------------------------------------------------------------------------

    def _local_layout(self, param: torch.Tensor, group: dict[str, Any]) -> MicroAdamLayout:
        """The layout of the rows of ``param`` held here (all of them unless it is a dim-0 shard)."""
        return self.layout_of(param, group).with_rows(to_local(param).shape[0])

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if not self.is_compressed(p, group):
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            return state
        # built from this rank's rows, wrapped with the global shape: Shard(0) like the parameter
        sharding = ParamSharding.of(p, transposed=False)
        layout = self.layout_of(p, group)
        start, stop = sharding.local_rows(layout.rows)
        local = self._local_layout(p, group)
        if local.rows != stop - start:
            raise RuntimeError(
                f"MicroAdam expected rows {start}:{stop} of {self.param_name(p)!r} ({layout.rows} rows split like "
                f"torch.chunk over {sharding.mesh.size()} ranks) on this rank, but its shard has {local.rows} rows; "
                "only FSDP2's dim-0 sharding (fully_shard) is supported."
            )
        shapes = layout.state_shapes(group["window"], group["error_feedback"])
        tensors = init_state(to_local(p), local, group["window"], error_feedback=group["error_feedback"])
        for key, tensor in zip(COMPRESSED_STATE, tensors):
            if tensor is not None:  # the error state, without error feedback
                state[key] = sharding.new_block_state(tensor, shapes[key], sharded=sharding.row_sharded)
        return state

    def _expected_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Per state key (``step`` aside): the global shape, and the dtype when it is part of the format."""
        if not self.is_compressed(param, group):
            return {key: (tuple(param.shape), None) for key in DENSE_STATE}
        shapes = self.layout_of(param, group).state_shapes(group["window"], group["error_feedback"])
        return {key: (shapes[key], COMPRESSED_STATE[key]) for key in shapes}

    def _check_param_state(self, name: str, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        expected = self._expected_state(param, group)
        keys = {"step", *expected}
        kind = "compressed" if self.is_compressed(param, group) else "AdamW (1-D or too small to compress)"
        if set(state) != keys:
            _check_error_state(name, set(state), keys, group["error_feedback"])
            raise ValueError(
                f"Cannot load optimizer state for {name!r}: it has the keys {sorted(state)}, but MicroAdam keeps "
                f"{sorted(keys)} for this {kind} parameter (missing {sorted(keys - set(state))}, unexpected "
                f"{sorted(set(state) - keys)}). The checkpoint was written by another optimizer, another version "
                "of MicroAdam or with other MicroAdam settings; resume with those, or load only the model weights."
            )
        for key, (shape, dtype) in expected.items():
            value = state[key]
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"Cannot load optimizer state for {name!r}: {key!r} has shape {list(value.shape)}, but MicroAdam "
                    f"with window={group['window']}, density={group['density']}, block_size={group['block_size']}, "
                    f"quant_bucket={group['quant_bucket']} expects {list(shape)}; build it with the settings the "
                    "checkpoint was written with."
                )
            if dtype is not None and value.dtype != dtype:
                raise ValueError(
                    f"Cannot load optimizer state for {name!r}: {key!r} is {value.dtype}, MicroAdam stores it as "
                    f"{dtype}. The checkpoint was converted or written by another implementation."
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by a MicroAdam with the same layout settings (dtypes kept).

        Raises:
            ValueError: if a group's ``window``/``density``/``block_size``/``quant_bucket``/
                ``min_compressed_numel``/``error_feedback`` differ, or a parameter's state does not fit
                (naming it and the key).
        """
        for i, (saved, group) in enumerate(zip(state_dict.get("param_groups", []), self.param_groups)):
            for key in LAYOUT_SETTINGS:
                if key not in saved:
                    raise ValueError(
                        f"Cannot load optimizer state: param group {i} has no {key!r}, so it was not saved by "
                        "MicroAdam; load it into the optimizer that wrote it (the checkpoint's weights load "
                        "without their optimizer state)."
                    )
                value = saved[key]
                if value != group[key]:
                    raise ValueError(
                        f"Cannot load optimizer state: param group {i} was saved with {key}={value!r}, "
                        f"this MicroAdam has {key}={group[key]!r}; {_setting_reason(key)}, "
                        f"so build the optimizer with {key}={value!r}."
                    )
        super().load_state_dict(state_dict)

    # ---- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Sharded (DTensor) parameters are updated from their local rows and local state: no
        communication.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hparams = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], maximize=group["maximize"])
            dense: dict[str, list[Any]] = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")}
            packed: dict[str, list[Any]] = {k: [] for k in ("params", "grads", *COMPRESSED_STATE, "steps", "layouts")}
            for p in group["params"]:
                grad = self._grad_of(p)
                if grad is None:
                    continue
                state = self._init_state(p, group)
                if self.is_compressed(p, group):
                    packed["params"].append(to_local(p))
                    packed["grads"].append(to_local(grad))
                    for key in COMPRESSED_STATE:  # the error state is None without error feedback
                        packed[key].append(to_local(state[key]) if key in state else None)
                    packed["steps"].append(state["step"])
                    packed["layouts"].append(self._local_layout(p, group))
                else:
                    values = (p, grad, state["exp_avg"], state["exp_avg_sq"])
                    for key, value in zip(dense, values):
                        dense[key].append(to_local(value))
                    dense["steps"].append(state["step"])
            if packed["params"]:
                micro_adam(*packed.values(), **hparams, backend=self.backend)
            if dense["params"]:
                block_adam(
                    *dense.values(),
                    [RowLayout(elementwise=True)] * len(dense["params"]),
                    **{**hparams, "lr": _as_float(group["lr"])},
                    backend=self.backend,
                )
        return loss


def _setting_reason(key: str) -> str:
    """Why a saved state needs the group setting ``key`` it was written with (for error messages)."""
    if key == "error_feedback":
        return f"a compressed parameter's state holds {list(ERROR_STATE)} only with error feedback"
    return "the compressed state's layout depends on it"


def _check_error_feedback(error_feedback: Any) -> None:
    """Raise ``ValueError`` unless ``error_feedback`` is a bool."""
    if not isinstance(error_feedback, bool):
        raise ValueError(f"Invalid error_feedback: {error_feedback!r} (must be True or False).")


def _check_error_state(name: str, saved: set[str], expected: set[str], error_feedback: bool) -> None:
    """Raise a ``ValueError`` naming the fix when the ``saved`` and ``expected`` state keys differ by the error state.

    Example: a state saved with ``error_feedback=False`` (keys ``step``, ``window``) loaded into a
    MicroAdam with error feedback, which expects ``error``, ``error_min``, ``error_max`` too.
    """
    if saved ^ expected != set(ERROR_STATE):
        return
    saved_with = set(ERROR_STATE) <= saved
    raise ValueError(
        f"Cannot load optimizer state for {name!r}: it was saved {'with' if saved_with else 'without'} error "
        f"feedback (its state {'holds' if saved_with else 'has no'} {list(ERROR_STATE)}), but this MicroAdam has "
        f"error_feedback={error_feedback}; build the optimizer with error_feedback={saved_with} to resume, or "
        "load only the model weights."
    )


def _as_float(value: float | torch.Tensor) -> float:
    return value.item() if isinstance(value, torch.Tensor) else value
