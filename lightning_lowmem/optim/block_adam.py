r"""``BlockAdam``: AdamW whose second moment is shared within the blocks of a :class:`BlockPlan`.

``AdamMini`` and ``Eve`` are this optimizer with their presets and defaults; the math is in
:mod:`lightning_lowmem.kernels.block_adam`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_lowmem.kernels import RowLayout, check_backend, state_dtype
from lightning_lowmem.kernels.block_adam import block_mean_sq
from lightning_lowmem.kernels.momentum_formats import DEFAULT_BLOCK, MomentumFormat, QuantizedMomentum
from lightning_lowmem.optim.base import LowMemOptimizer, ParamsLike, check_torch_options, param_groups_from
from lightning_lowmem.optim.functional import block_adam
from lightning_lowmem.optim.momentum_state import SCALE_KEY, check_momentum_state, convert_momentum_, group_format, new_momentum
from lightning_lowmem.optim.sharding import ParamSharding, all_reduce_block_means, to_local
from lightning_lowmem.optim.hparams import check_adam_hparams
from lightning_lowmem.partition import NO_DECAY_ROLES, BlockPlan, ParamBlocks, build_plan, build_plan_from_named_parameters
from lightning_lowmem.partition.build import compile_rules

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
        named = _named_parameters_of(groups, type(self).__name__)
        if plan is None and model is not None:
            plan = build_plan(model, preset, rules)
        elif plan is None:  # names and shapes only; frozen tensors get blocks too, should they be unfrozen
            plan = build_plan_from_named_parameters([(n, p if p.requires_grad else p.shape) for n, p in named], preset, rules)
        _check_plan_covers(plan, named)
        self.plan = plan
        self.preset, self.rules = preset, rules
        self._plan_new(named)  # frozen parameters a given plan lacks: blocks by name (their roles decide decay)
        if not user_grouped:
            groups = _decay_groups(named, self.plan, no_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        exp_avg_dtype=exp_avg_dtype, exp_avg_block=exp_avg_block,
                        stochastic_rounding=bool(stochastic_rounding))
        super().__init__(groups, defaults)
        if model is not None:
            self.bind_model(model)
        self.backend = backend
        self._placements: dict[torch.Tensor, _Placement] = {}

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
            named = _named_parameters_of([{"params": params}], type(self).__name__)
            self._plan_new(named)
            _check_plan_covers(self.plan, named)
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)

    def _plan_new(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Extend :attr:`plan` with entries for the parameters of ``named`` it lacks."""
        missing = [(n, p) for n, p in named if n not in self.plan]
        if not missing:
            return
        found: list[ParamBlocks] = []
        model = self.bound_model
        if model is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the model's fallbacks were reported when first planned
                structural = build_plan(model, self.preset, _rules_for(self.rules, [n for n, _ in missing]),
                                        include_frozen=True)
            found = [structural[n] for n, _ in missing if n in structural]
        rest = [(n, p.shape) for n, p in missing if all(e.name != n and n not in e.aliases for e in found)]
        if rest:
            by_name = build_plan_from_named_parameters(rest, self.preset, _rules_for(self.rules, [n for n, _ in rest]))
            found += [by_name[n] for n, _ in rest]
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

    def _placement(self, name: str, param: torch.Tensor) -> _Placement:
        placement = self._placements.get(param)
        if placement is None:
            entry = self._entry(name, param)
            if _split_banks(entry):
                # dim 0 indexes banks (experts) and no block spans two: FSDP2 keeps whole banks on a
                # rank and their state with them, and each bank is updated as a 2-D matrix
                sharding = ParamSharding.of(param, transposed=False)
                start, stop = sharding.local_rows(entry.shape[0])
                layout = layout_for(_one_bank(entry), to_local(param).device)
                placement = _Placement(layout, sharding, False, (start, stop), bank_shape=entry.shape[entry.bank_dims:])
            else:
                sharding = ParamSharding.of(param, entry.transposed)
                start, stop = sharding.local_rows(entry.rows)
                layout = layout_for(entry, to_local(param).device, rows=slice(start, stop))
                reduce = sharding.needs_reduction(layout.elementwise, one_block_per_row=layout.group_index is None)
                placement = _Placement(layout, sharding, reduce, (start, stop))
            self._placements[param] = placement
        return placement

    def _momentum_format(self, name: str, param: torch.Tensor, group: dict[str, Any]) -> MomentumFormat | None:
        """The stored format of ``param``'s momentum, ``None`` for a tensor in the parameter's dtype."""
        return group_format(group, param, banked=_split_banks(self._entry(name, param)))

    def _init_state(self, name: str, param: torch.Tensor, placement: _Placement, group: dict[str, Any]) -> dict[str, Any]:
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

    def _init_group(self, group: dict[str, Any]) -> _GroupBatch:
        batch = _GroupBatch()
        for name, p in zip(group["param_names"], group["params"]):
            grad = self._grad_of(p)
            if grad is None:
                continue
            placement = self._placement(name, p)
            state = self.state[p] or self._init_state(name, p, placement, group)
            fmt = self._momentum_format(name, p, group)
            if fmt is None and group["stochastic_rounding"] and p.dtype == torch.bfloat16:
                fmt = MomentumFormat("fp32")  # the momentum as it is, the parameter rounded at random
            batch.add(p, grad, state, placement, fmt)
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
        _reduce_block_means([batch for _, batch in batches])
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
            )
        return loss


class _Placement(NamedTuple):
    """A parameter's local layout and where its rows live (cached per parameter)."""

    layout: RowLayout
    sharding: ParamSharding
    reduce: bool  # its block means are partial sums that must be all-reduced
    rows: tuple[int, int]  # this rank's rows of the row view (of dim 0 for a bank)
    bank_shape: tuple[int, ...] | None = None  # a bank's shape when each bank is its own 2-D matrix


@dataclasses.dataclass
class _GroupBatch:
    """The local tensors of one param group that have a gradient this step."""

    params: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avgs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    steps: list[torch.Tensor] = dataclasses.field(default_factory=list)
    layouts: list[RowLayout] = dataclasses.field(default_factory=list)
    placements: list[_Placement] = dataclasses.field(default_factory=list)
    mean_sqs: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    formats: list[MomentumFormat | None] = dataclasses.field(default_factory=list)

    def add(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], placement: _Placement,
            fmt: MomentumFormat | None) -> None:
        if placement.bank_shape is not None:
            self._add_banks(param, grad, state, placement, fmt)
            return
        self.params.append(to_local(param))
        self.grads.append(to_local(grad))
        exp_avg = to_local(state["exp_avg"])
        scales = state.get(SCALE_KEY)
        self.exp_avgs.append(exp_avg if fmt is None else QuantizedMomentum(exp_avg, None if scales is None else to_local(scales)))
        self.formats.append(fmt)
        self.exp_avg_sqs.append(to_local(state["exp_avg_sq"]))
        self.steps.append(state["step"])
        self.layouts.append(placement.layout)
        self.placements.append(placement)
        self.mean_sqs.append(None)

    def _add_banks(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], placement: _Placement,
                   fmt: MomentumFormat | None) -> None:
        """Each local bank (expert) as its own tensor: views of the parameter, gradient and state.
        The functional core increments every step it is given, so banks after the first get a copy."""
        shape = placement.bank_shape
        # views (not copies) of what is updated in place; the gradient is only read
        views = [to_local(param).view(-1, *shape), to_local(grad).reshape(-1, *shape), to_local(state["exp_avg"]).view(-1, *shape)]
        v = to_local(state["exp_avg_sq"]).view(views[0].shape[0], -1)
        for b in range(views[0].shape[0]):
            self.params.append(views[0][b])
            self.grads.append(views[1][b])
            self.exp_avgs.append(views[2][b] if fmt is None else QuantizedMomentum(views[2][b]))
            self.formats.append(fmt)
            self.exp_avg_sqs.append(v[b])
            self.steps.append(state["step"] if b == 0 else state["step"].clone())
            self.layouts.append(placement.layout)
            self.placements.append(placement)
            self.mean_sqs.append(None)


def _reduce_block_means(batches: list[_GroupBatch]) -> None:
    """Compute the partial block means that span ranks and sum them all in one collective."""
    pending = [(b, i) for b in batches for i, placement in enumerate(b.placements) if placement.reduce]
    if not pending:
        return
    meshes = {id(b.placements[i].sharding.mesh): b.placements[i].sharding.mesh for b, i in pending}
    if len(meshes) > 1:
        raise ValueError("All sharded parameters of one optimizer must live on the same device mesh.")
    partial = [block_mean_sq(b.grads[i], b.layouts[i]) for b, i in pending]
    reduced = all_reduce_block_means(partial, next(iter(meshes.values())))
    for (b, i), mean_sq in zip(pending, reduced):
        b.mean_sqs[i] = mean_sq


def _split_banks(entry: ParamBlocks) -> bool:
    """Whether the parameter is updated bank by bank (it has bank dims and shared blocks)."""
    return entry.bank_dims > 0 and not entry.is_full


def _one_bank(entry: ParamBlocks) -> ParamBlocks:
    """The layout of one bank of ``entry`` (the same for every bank)."""
    return dataclasses.replace(entry, shape=entry.shape[entry.bank_dims:], bank_dims=0, aliases=())


def layout_for(entry: ParamBlocks, device: torch.device, rows: slice = slice(None)) -> RowLayout:
    """The :class:`RowLayout` of a parameter of the plan for its ``rows`` held here, on ``device``."""
    if entry.is_full:
        return RowLayout(transposed=entry.transposed, elementwise=True)
    index = entry.group_index(device)
    if index is not None:
        index = index[rows]
    if index is None:
        return RowLayout(transposed=entry.transposed, elementwise=False, group_numel=float(entry.cols))
    sizes = torch.tensor(entry.group_sizes(), dtype=torch.float64, device=device) * entry.cols
    return RowLayout(transposed=entry.transposed, elementwise=False, group_index=index, group_numel=sizes)


def _named_parameters_of(groups: list[dict[str, Any]], owner: str) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = []
    for group in groups:
        for item in group["params"]:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(
                    f"{owner} needs parameter names to find each parameter's block: pass the model, "
                    "model.named_parameters(), or groups like {'params': [(name, tensor), ...]}. With LightningCLI, "
                    "whose --optimizer passes model.parameters(), inject the optimizer into the model instead: an "
                    "OptimizerCallable argument set as self.lowmem_optimizer of LowMemOptimizerMixin (see docs/quickstart.md)."
                )
            named.append(item)
    return named


def _rules_for(rules: Any, names: list[str]) -> list[tuple[re.Pattern[str], Any]] | None:
    """The user's rules that match one of ``names`` (a plan of a few parameters must not see the others' rules)."""
    if rules is None:
        return None
    return [(rule.regex, rule.spec) for rule in compile_rules(rules) if any(rule.regex.search(n) for n in names)]


def _check_plan_covers(plan: BlockPlan, named: list[tuple[str, torch.Tensor]]) -> None:
    """Raise unless every trainable parameter of ``named`` has a plan entry of its shape (frozen ones get theirs
    when they first have a gradient)."""
    missing = [n for n, p in named if n not in plan and p.requires_grad]
    if missing:
        raise ValueError(
            f"The block plan has no entry for the trainable parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}: "
            "it was built from another model, or while they were frozen. Build it from this model once they are "
            "trainable (build_plan(model)), leave out plan= to let the optimizer build it, or add rules for them."
        )
    wrong = [(n, list(p.shape), list(plan[n].shape)) for n, p in named if n in plan and tuple(p.shape) != plan[n].shape]
    if wrong:
        name, got, planned = wrong[0]
        raise ValueError(
            f"The block plan was built for other shapes: {name!r} is {got} but the plan says {planned}; "
            "rebuild the plan from this model."
        )


def model_decay_groups(model: nn.Module, no_decay: Sequence[str] = NO_DECAY_ROLES) -> list[dict[str, Any]]:
    """The decayed / not-decayed param groups of ``model``'s trainable parameters, by their roles.

    These are the groups :class:`BlockAdam` builds (roles come from the model's structure and do not
    depend on the preset), with ``(name, parameter)`` pairs so a state dict is named.

    Example::

        >>> [len(g["params"]) for g in model_decay_groups(model, ("bias", "norm"))]
        [4, 6]
    """
    with warnings.catch_warnings():  # the plan's block fallbacks are irrelevant here: only roles are read
        warnings.simplefilter("ignore", UserWarning)
        plan = build_plan(model, "adam_mini")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return _decay_groups(named, plan, no_decay)


def _decay_groups(
    named: list[tuple[str, torch.Tensor]], plan: BlockPlan, no_decay: Sequence[str]
) -> list[dict[str, Any]]:
    """Split ``named`` into a decayed group and a ``weight_decay=0`` group by the plan's roles."""
    decay = [(n, p) for n, p in named if plan[n].role not in no_decay]
    keep = [(n, p) for n, p in named if plan[n].role in no_decay]
    log.info("Weight decay on %d tensors; none on %d tensors with roles %s.", len(decay), len(keep), tuple(no_decay))
    groups = []
    if decay:
        groups.append({"params": decay})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups
