r"""``BlockAdam``: AdamW whose second moment is shared within the blocks of a :class:`BlockPlan`.

``AdamMini`` and ``Eve`` are this optimizer with their presets and defaults; the math is in
:mod:`lightning_lowmem.kernels.block_adam`. This module holds the optimizer class: its public API,
its state and its step. It builds on
:mod:`~lightning_lowmem.optim.param_groups` (names, plan coverage, decay groups),
:mod:`~lightning_lowmem.optim.placement` (where a parameter's rows and state live) and
:mod:`~lightning_lowmem.optim.step_batch` (the local tensors of one step), none of which imports it.
``layout_for`` and ``model_decay_groups`` are importable from here as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_lowmem.kernels import check_backend, state_dtype
from lightning_lowmem.kernels.momentum_formats import DEFAULT_BLOCK, MomentumFormat
from lightning_lowmem.optim.base import LowMemOptimizer, ParamsLike, check_torch_options, param_groups_from
from lightning_lowmem.optim.functional import block_adam
from lightning_lowmem.optim.hparams import check_adam_hparams
from lightning_lowmem.optim.momentum_state import SCALE_KEY, check_momentum_state, convert_momentum_, group_format, new_momentum
from lightning_lowmem.optim.param_groups import check_plan_covers, decay_groups, named_parameters_of, plan_missing
from lightning_lowmem.optim.param_groups import model_decay_groups  # noqa: F401  (re-exported: its former home)
from lightning_lowmem.optim.placement import Placement, place, split_banks
from lightning_lowmem.optim.placement import layout_for  # noqa: F401  (re-exported: its former home)
from lightning_lowmem.optim.sharding import to_local
from lightning_lowmem.optim.step_batch import GroupBatch, reduce_block_means
from lightning_lowmem.partition import NO_DECAY_ROLES, BlockPlan, ParamBlocks, build_plan, build_plan_from_named_parameters

log = logging.getLogger(__name__)

STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})


class BlockAdam(LowMemOptimizer):
    r"""AdamW with one second-moment value per block (see :mod:`lightning_lowmem.kernels.block_adam`).

    .. math::

        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{i\in b}\, g_i^2, \qquad
        \theta_i \leftarrow \theta_i(1-\eta\lambda) - \eta\,\frac{\hat m_i}{\sqrt{\hat v_{b(i)}} + \epsilon}

    Args:
        params: a model (its structure decides the blocks), ``model.named_parameters()`` (names and
            shapes decide: a fallback), or param-group dicts whose ``params`` are ``(name, tensor)``
            pairs (then pass ``plan``, or the names decide).
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v}`.
        weight_decay: decoupled weight decay :math:`\lambda`.
        plan: a :class:`BlockPlan` (e.g. from :func:`build_plan`); built from ``params`` if omitted.
        preset: the partition preset used when the plan is built here.
        rules: ``{regex: spec}`` overriding the preset (see :func:`build_plan`).
        no_decay: roles put in a group with ``weight_decay=0`` when the groups are built here
            (``()`` decays everything).
        maximize: maximize the objective instead of minimizing it.
        backend: ``"auto"``, ``"torch"``, ``"compile"``, ``"triton"`` or ``"native"``
            (see :func:`lightning_lowmem.kernels.resolve`).
        exp_avg_dtype: how the momentum is stored: ``"fp32"`` (the parameter's dtype, as
            ``torch.optim.AdamW``), ``"bf16"`` (stochastic rounding), ``"int8"`` or ``"int4"``
            (blockwise codes; parameters of fewer than 2 dims keep ``"fp32"``); see
            :mod:`lightning_lowmem.kernels.momentum_formats`.
        exp_avg_block: entries of one row per scale of ``"int8"``/``"int4"`` (even for int4).
        stochastic_rounding: write bf16 parameters with stochastic rounding, so that updates below
            half a bf16 step are kept on average.
        **torch_options: ``torch.optim.AdamW``'s ``foreach``, ``fused``, ``capturable`` and
            ``differentiable`` are accepted as ``None``/``False`` only; a true value raises a
            ``ValueError`` that says what ``backend`` does instead.

    Frozen parameters: a model leaves them out (Lightning's ``BaseFinetuning`` adds them with
    ``add_param_group`` when it unfreezes them: they get blocks from the model then);
    ``model.named_parameters()`` keeps them, with blocks from their names and shapes, so setting
    ``requires_grad`` back to ``True`` later trains them. ``copy.deepcopy``, ``pickle`` and
    ``torch.save`` keep the plan and the backend.

    Raises:
        ValueError: for a hyperparameter out of range, a torch implementation switch
            (``fused=True``, ...), a parameter without a name or missing from the plan, or a plan
            built for other shapes.

    Example::

        >>> opt = BlockAdam(model, lr=3e-4, preset="adam_mini")
        >>> print(opt.plan)
    """

    _PICKLED_ATTRIBUTES = ("backend", "plan", "preset", "rules")

    def __init__(
        self,
        params: ParamsLike,
        lr: float | torch.Tensor = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        plan: BlockPlan | None = None,
        preset: str = "adam_mini",
        rules: Any = None,
        no_decay: Sequence[str] = NO_DECAY_ROLES,
        maximize: bool = False,
        backend: str = "auto",
        exp_avg_dtype: str = "fp32",
        exp_avg_block: int = DEFAULT_BLOCK,
        stochastic_rounding: bool = False,
        **torch_options: Any,
    ) -> None:
        check_torch_options(type(self).__name__, torch_options)
        check_adam_hparams(lr, betas, eps, weight_decay)
        check_backend(backend)
        MomentumFormat.of(exp_avg_dtype, exp_avg_block)
        model = params if isinstance(params, nn.Module) else None
        groups, user_grouped = param_groups_from(params)
        named = named_parameters_of(groups, type(self).__name__)
        if plan is None and model is not None:
            plan = build_plan(model, preset, rules)
        elif plan is None:  # names and shapes only; frozen tensors get blocks too, should they be unfrozen
            plan = build_plan_from_named_parameters([(n, p if p.requires_grad else p.shape) for n, p in named], preset, rules)
        check_plan_covers(plan, named)
        self.plan = plan
        self.preset, self.rules = preset, rules
        self._plan_new(named)  # frozen parameters a given plan lacks: blocks by name (their roles decide decay)
        if not user_grouped:
            groups = decay_groups(named, self.plan, no_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        exp_avg_dtype=exp_avg_dtype, exp_avg_block=exp_avg_block,
                        stochastic_rounding=bool(stochastic_rounding))
        super().__init__(groups, defaults)
        if model is not None:
            self.bind_model(model)
        self.backend = backend
        self._placements: dict[torch.Tensor, Placement] = {}

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._placements = {}

    # ---- parameters added later ----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group like ``torch.optim.Optimizer.add_param_group``; its parameters get blocks now.

        ``params`` may be ``(name, tensor)`` pairs, or plain tensors of the model the optimizer was
        built on (named from it, as Lightning's ``BaseFinetuning`` needs). New parameters get their
        blocks from that model's structure when it is known, else from their names and shapes
        (as :func:`~lightning_lowmem.partition.build_plan_from_named_parameters`).

        Raises:
            ValueError: for a tensor without a name, or a parameter whose blocks cannot be built.
        """
        param_group = self._named_group(param_group)
        if isinstance(param_group, dict) and hasattr(self, "plan"):
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            named = named_parameters_of([{"params": params}], type(self).__name__)
            self._plan_new(named)
            check_plan_covers(self.plan, named)
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)

    def _plan_new(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Extend :attr:`plan` with entries for the parameters of ``named`` it lacks."""
        found = plan_missing(self.plan, named, self.bound_model, self.preset, self.rules)
        if not found:
            return
        self.plan = BlockPlan([*self.plan.values(), *found], preset=self.plan.preset)
        log.info("Blocks for parameters added to %s: %s", type(self).__name__, [e.name for e in found])

    def state_segments(self) -> dict[torch.Tensor, list[tuple[str, int, int]]]:
        """``param -> [(kind, parameters, v entries), ...]``: its ``v`` in order, as runs of one kind
        (:meth:`~lightning_lowmem.partition.ParamBlocks.kind_runs`)."""
        return {p: self.plan[name].kind_runs() for name, p, _ in self.named_params()}

    def summary(self) -> str:
        """The block plan as a table (:meth:`BlockPlan.summary`)."""
        return self.plan.summary()

    # ---- state ---------------------------------------------------------------------------------

    def _entry(self, name: str, param: torch.Tensor) -> ParamBlocks:
        if name not in self.plan:  # a group assigned without add_param_group (BaseFinetuning on resume)
            self._plan_new([(name, param)])
        return self.plan[name]

    def _placement(self, name: str, param: torch.Tensor) -> Placement:
        placement = self._placements.get(param)
        if placement is None:
            placement = place(self._entry(name, param), param)
            self._placements[param] = placement
        return placement

    def _momentum_format(self, name: str, param: torch.Tensor, group: dict[str, Any]) -> MomentumFormat | None:
        """The stored format of ``param``'s momentum, ``None`` for a tensor in the parameter's dtype."""
        return group_format(group, param, banked=split_banks(self._entry(name, param)))

    def _init_state(self, name: str, param: torch.Tensor, placement: Placement, group: dict[str, Any]) -> dict[str, Any]:
        entry, state = self._entry(name, param), self.state[param]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state.update(new_momentum(param, self._momentum_format(name, param, group)))
        if placement.layout.elementwise:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)
        else:
            row_local = placement.sharding.row_sharded and not placement.reduce
            start, stop = placement.rows
            if placement.bank_shape is not None:  # [dim-0 banks here, *other bank dims, blocks per bank]
                shape: tuple[int, ...] = (stop - start, *entry.state_shape()[1:])
            else:
                shape = (stop - start if row_local else entry.state_numel,)
            local = torch.zeros(shape, dtype=state_dtype(param), device=to_local(param).device)
            state["exp_avg_sq"] = placement.sharding.new_block_state(local, entry.state_shape(), sharded=row_local)
        return state

    def _init_group(self, group: dict[str, Any]) -> GroupBatch:
        batch = GroupBatch()
        for position, (name, p) in enumerate(zip(group["param_names"], group["params"])):
            grad = self._grad_of(p)
            if grad is None:
                continue
            placement = self._placement(name, p)
            state = self.state[p] or self._init_state(name, p, placement, group)
            fmt = self._momentum_format(name, p, group)
            if fmt is None and group["stochastic_rounding"] and p.dtype == torch.bfloat16:
                fmt = MomentumFormat("fp32")  # the momentum as it is, the parameter rounded at random
            batch.add(p, grad, state, placement, fmt, position)
        return batch

    def _check_param_state(self, name: str, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        owner = type(self).__name__
        fmt = self._momentum_format(name, param, group)
        keys = STATE_KEYS | {SCALE_KEY} if fmt is not None and fmt.quantized else STATE_KEYS
        if set(state) != keys:
            raise ValueError(
                f"Cannot load optimizer state for {name!r}: it has the keys {sorted(state)}, "
                f"{owner} keeps {sorted(keys)}. The checkpoint was written by another optimizer; "
                "resume with that optimizer, or load only the model weights."
            )
        entry = self._entry(name, param)
        expected = {"exp_avg_sq": entry.state_shape(), **check_momentum_state(name, param, fmt, state)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"Cannot load optimizer state for {name!r}: {key!r} has shape {list(state[key].shape)}, "
                    f"but this {owner} plan ({entry.kind} blocks) expects {list(shape)}. The checkpoint was "
                    "written with another optimizer or partition; use the same preset and rules."
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; a momentum saved in another ``exp_avg_dtype`` (or block) is converted
        to this optimizer's, with one log line (see :func:`~lightning_lowmem.optim.momentum_state.convert_momentum_`)."""
        super().load_state_dict(convert_momentum_(self, state_dict))

    # ---- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [(group, self._init_group(group)) for group in self.param_groups]
        reduce_block_means([batch for _, batch in batches])
        for index, (group, batch) in enumerate(batches):
            if not batch.params:
                continue
            beta1, beta2 = group["betas"]
            block_adam(
                batch.params,
                batch.grads,
                batch.exp_avgs,
                batch.exp_avg_sqs,
                batch.steps,
                batch.layouts,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                mean_sqs=batch.mean_sqs,
                backend=self.backend,
                formats=batch.formats,
                stochastic_rounding=group["stochastic_rounding"],
                seed=index << 20,
                positions=batch.positions,
                index_bases=batch.index_bases,
            )
        return loss

