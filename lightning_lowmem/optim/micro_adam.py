r"""``MicroAdam``: Adam over a window of compressed gradients, with compressed error feedback.

The math lives in :mod:`lightning_lowmem.optim.micro_adam_functional`; this class holds the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_lowmem.kernels.dispatch import check_backend
from lightning_lowmem.optim.base import LowMemOptimizer, ParamsLike
from lightning_lowmem.optim.functional import RowLayout, block_adam, state_dtype
from lightning_lowmem.optim.hparams import check_adam_hparams
from lightning_lowmem.optim.micro_adam_functional import (
    DEFAULT_BLOCK_SIZE,
    MicroAdamLayout,
    check_micro_adam_hparams,
    init_state,
    micro_adam,
    micro_adam_layout,
)

#: State keys of a compressed parameter, in :func:`init_state`'s order, with their dtypes.
COMPRESSED_STATE = {
    "window_indices": torch.int16,
    "window_values": torch.bfloat16,
    "error": torch.uint8,
    "error_min": torch.bfloat16,
    "error_max": torch.bfloat16,
}
#: State keys of a parameter too small to compress (plain AdamW).
DENSE_STATE = ("exp_avg", "exp_avg_sq")
#: Group settings that decide the state's layout: a checkpoint must have been written with the same.
LAYOUT_SETTINGS = ("window", "density", "block_size", "quant_bucket", "min_compressed_numel")


class MicroAdam(LowMemOptimizer):
    r"""MicroAdam (Modoranu et al., 2024): Adam whose state is a window of sparse gradients.

    For each parameter, flattened to :math:`d` coordinates, at step :math:`t`:

    .. math::

        a &= g_t + \mathrm{deq}(e)
            && \text{gradient plus the 4-bit error feedback}\\
        I &= \textstyle\bigcup_b \operatorname{top-k}_{i\in b} |a_i|,\quad
            (I, a_I) \to \text{ring row } (t-1) \bmod m
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

    State per compressed parameter (``step`` aside): ``window_indices`` int16 ``[m, K]``,
    ``window_values`` bf16 ``[m, K]``, ``error`` uint8 ``[ceil(d/2)]`` (two 4-bit codes per
    byte), ``error_min``/``error_max`` bf16 ``[ceil(d/bucket)]``:
    :math:`0.5 + 4/\text{bucket} + 4mk/\text{block}` = 0.963 bytes per parameter at the defaults
    (8 for fp32 AdamW). Parameters with fewer than ``min_compressed_numel`` elements (by default one
    block, 4096: biases, norms) keep AdamW's ``exp_avg``/``exp_avg_sq`` and are updated by the same
    functional core as AdamW (:func:`lightning_lowmem.optim.functional.block_adam_update_`);
    below one block the top-k would keep a handful of coordinates per step, and such tensors are a
    tiny fraction of a transformer (0.1% of GPT-2 small). :meth:`compressed_names` and
    :meth:`summary` say which parameters are compressed.

    Args:
        params: a model, ``model.named_parameters()``, tensors, or param-group dicts.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`, added to :math:`\sqrt{c_2 S}`.
        weight_decay: decoupled weight decay :math:`\lambda` (0 by default, as the official code).
        window: :math:`m`, sparse gradients kept.
        density: fraction of each block kept, :math:`k = \max(1, \lceil \text{density}\cdot\text{block}\rceil)`
            (the shorter last block keeps :math:`\max(1, \lceil \text{density}\cdot\text{its size}\rceil)`).
        block_size: coordinates per top-k block, at most 32768 (int16 relative indices). The
            default 4096 does not depend on the device, so checkpoints move between devices.
        quant_bucket: coordinates per min/max bucket of the error feedback (even).
        min_compressed_numel: parameters with fewer elements keep AdamW state; ``None`` means
            ``block_size``.
        maximize: maximize the objective instead of minimizing it.
        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else ``torch.compile`` where
            supported, else eager), ``"torch"``, ``"compile"`` or ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``); see :mod:`lightning_lowmem.kernels.dispatch`.

    Raises:
        ValueError: for a hyperparameter out of range, naming it.

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
        min_compressed_numel: int | None = None,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        check_adam_hparams(lr, betas, eps, weight_decay)
        check_micro_adam_hparams(window, density, block_size, quant_bucket)
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
            min_compressed_numel=min_compressed_numel,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_micro_adam_hparams(group["window"], group["density"], group["block_size"], group["quant_bucket"])
        sharded = [name for name, p, _ in self.named_params() if _is_dtensor(p)]
        if sharded:
            raise NotImplementedError(
                f"MicroAdam does not support sharded (DTensor) parameters yet ({sharded[0]!r}): its window and "
                "error feedback are laid out over the whole flattened tensor. Use a strategy that does not shard "
                "parameters, or AdamMini/Eve under FSDP2."
            )
        self.backend = backend

    # ---- which parameters are compressed -------------------------------------------------------

    @staticmethod
    def is_compressed(param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param`` gets compressed state under ``group``'s settings."""
        return param.numel() >= group["min_compressed_numel"]

    @staticmethod
    def layout_of(param: torch.Tensor, group: dict[str, Any]) -> MicroAdamLayout:
        """The block/bucket layout of a compressed parameter under ``group``'s settings."""
        return micro_adam_layout(
            param.numel(), block_size=group["block_size"], density=group["density"], quant_bucket=group["quant_bucket"]
        )

    def compressed_names(self) -> list[str]:
        """Names of the parameters with compressed state (the others keep AdamW state)."""
        return [name for name, p, group in self.named_params() if self.is_compressed(p, group)]

    def state_bytes(self) -> int:
        """Bytes of optimizer state: allocated tensors where state exists, else what will be allocated."""
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
            return self.layout_of(param, group).state_bytes(group["window"]) + step_bytes
        return param.numel() * (param.element_size() + torch.empty(0, dtype=state_dtype(param)).element_size()) + step_bytes

    def summary(self) -> str:
        """A table: each parameter, its size, whether it is compressed, its state bytes per element."""
        rows = [("name", "shape", "numel", "state", "bytes/param")]
        numel = state = 0
        for name, p, group in self.named_params():
            nbytes = self._planned_bytes(p, group)
            kind = "compressed" if self.is_compressed(p, group) else "adamw"
            rows.append((name, str(list(p.shape)), str(p.numel()), kind, f"{nbytes / p.numel():.3f}"))
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

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if self.is_compressed(p, group):
                tensors = init_state(p, self.layout_of(p, group), group["window"])
                state.update(zip(COMPRESSED_STATE, tensors))
            else:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        return state

    def _expected_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Per state key (``step`` aside): the shape, and the dtype when it is part of the format."""
        if not self.is_compressed(param, group):
            return {key: (tuple(param.shape), None) for key in DENSE_STATE}
        layout = self.layout_of(param, group)
        row = (group["window"], layout.topk_per_row)
        shapes = [row, row, (layout.packed_numel,), (layout.num_buckets,), (layout.num_buckets,)]
        return {key: (shape, dtype) for (key, dtype), shape in zip(COMPRESSED_STATE.items(), shapes)}

    def _check_param_state(self, name: str, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        expected = self._expected_state(param, group)
        keys = {"step", *expected}
        kind = "compressed" if self.is_compressed(param, group) else "AdamW (too small to compress)"
        if set(state) != keys:
            raise ValueError(
                f"Cannot load optimizer state for {name!r}: it has the keys {sorted(state)}, but MicroAdam keeps "
                f"{sorted(keys)} for this {kind} parameter (missing {sorted(keys - set(state))}, unexpected "
                f"{sorted(set(state) - keys)}). The checkpoint was written by another optimizer or with other "
                "MicroAdam settings; resume with those, or load only the model weights."
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
                ``min_compressed_numel`` differ, or a parameter's state does not fit (naming it and the key).
        """
        for i, (saved, group) in enumerate(zip(state_dict.get("param_groups", []), self.param_groups)):
            for key in LAYOUT_SETTINGS:
                if key in saved and saved[key] != group[key]:
                    raise ValueError(
                        f"Cannot load optimizer state: param group {i} was saved with {key}={saved[key]!r}, "
                        f"this MicroAdam has {key}={group[key]!r}; the compressed state's layout depends on it, "
                        f"so build the optimizer with {key}={saved[key]!r}."
                    )
        super().load_state_dict(state_dict)

    # ---- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
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
                    packed["params"].append(p)
                    packed["grads"].append(grad)
                    for key in COMPRESSED_STATE:
                        packed[key].append(state[key])
                    packed["steps"].append(state["step"])
                    packed["layouts"].append(self.layout_of(p, group))
                else:
                    for key, value in zip(dense, (p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                        dense[key].append(value)
            if packed["params"]:
                micro_adam(*packed.values(), **hparams, backend=self.backend)
            if dense["params"]:
                block_adam(
                    *dense.values(),
                    [RowLayout(elementwise=True)] * len(dense["params"]),
                    **{**hparams, "lr": _as_float(group["lr"])},
                    backend="auto" if self.backend == "triton" else self.backend,
                )
        return loss


def _as_float(value: float | torch.Tensor) -> float:
    return value.item() if isinstance(value, torch.Tensor) else value


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
