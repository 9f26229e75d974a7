r"""``BlockAdam``: AdamW whose second moment is shared within the blocks of a :class:`BlockPlan`.

``AdamMini`` and ``Eve`` are this optimizer with their presets and defaults; the math is in
:mod:`lightning_lowmem.optim.functional`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_lowmem.kernels.dispatch import check_backend
from lightning_lowmem.optim.base import LowMemOptimizer, ParamsLike, param_groups_from
from lightning_lowmem.optim.functional import RowLayout, block_adam, block_mean_sq, state_dtype
from lightning_lowmem.optim.sharding import ParamSharding, all_reduce_block_means, to_local
from lightning_lowmem.optim.hparams import check_adam_hparams
from lightning_lowmem.partition import NO_DECAY_ROLES, BlockPlan, ParamBlocks, build_plan, build_plan_from_named_parameters

log = logging.getLogger(__name__)

STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})


class BlockAdam(LowMemOptimizer):
    r"""AdamW with one second-moment value per block (see :mod:`lightning_lowmem.optim.functional`).

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
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``
            (see :mod:`lightning_lowmem.kernels.dispatch`).

    Raises:
        ValueError: for a hyperparameter out of range, a parameter without a name or missing from
            the plan, or a plan built for other shapes.

    Example::

        >>> opt = BlockAdam(model, lr=3e-4, preset="adam_mini")
        >>> print(opt.plan)
    """

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
    ) -> None:
        check_adam_hparams(lr, betas, eps, weight_decay)
        check_backend(backend)
        model = params if isinstance(params, nn.Module) else None
        groups, user_grouped = param_groups_from(params)
        named = _named_parameters_of(groups, type(self).__name__)
        if plan is None:
            plan = build_plan(model, preset, rules) if model is not None else build_plan_from_named_parameters(named, preset, rules)
        _check_plan_covers(plan, named)
        if not user_grouped:
            groups = _decay_groups(named, plan, no_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(groups, defaults)
        self.plan = plan
        self.backend = backend
        self._placements: dict[torch.Tensor, _Placement] = {}

    def state_segments(self) -> dict[torch.Tensor, list[tuple[str, int, int]]]:
        """``param -> [(kind, parameters, v entries), ...]`` per segment of its plan entry, in ``v``'s order."""
        out = {}
        for name, p, _ in self.named_params():
            entry = self.plan[name]
            out[p] = [(spec.kind, rows * entry.cols, spec.num_blocks(rows, entry.cols)) for spec, rows in entry.segments]
        return out

    def summary(self) -> str:
        """The block plan as a table (:meth:`BlockPlan.summary`)."""
        return self.plan.summary()

    # ---- state ---------------------------------------------------------------------------------

    def _entry(self, name: str) -> ParamBlocks:
        return self.plan[name]

    def _placement(self, name: str, param: torch.Tensor) -> _Placement:
        placement = self._placements.get(param)
        if placement is None:
            entry = self._entry(name)
            sharding = ParamSharding.of(param, entry.transposed)
            start, stop = sharding.local_rows(entry.rows)
            layout = layout_for(entry, to_local(param).device, rows=slice(start, stop))
            reduce = sharding.needs_reduction(layout.elementwise, one_block_per_row=layout.group_index is None)
            placement = _Placement(layout, sharding, reduce, (start, stop))
            self._placements[param] = placement
        return placement

    def _init_state(self, name: str, param: torch.Tensor, placement: _Placement) -> dict[str, Any]:
        entry, state = self._entry(name), self.state[param]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if placement.layout.elementwise:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)
        else:
            row_local = placement.sharding.row_sharded and not placement.reduce
            start, stop = placement.rows
            numel = stop - start if row_local else entry.state_numel
            local = torch.zeros(numel, dtype=state_dtype(param), device=to_local(param).device)
            state["exp_avg_sq"] = placement.sharding.new_block_state(local, entry.state_shape(), sharded=row_local)
        return state

    def _init_group(self, group: dict[str, Any]) -> _GroupBatch:
        batch = _GroupBatch()
        for name, p in zip(group["param_names"], group["params"]):
            grad = self._grad_of(p)
            if grad is None:
                continue
            placement = self._placement(name, p)
            state = self.state[p] or self._init_state(name, p, placement)
            batch.add(p, grad, state, placement)
        return batch

    def _check_param_state(self, name: str, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        owner = type(self).__name__
        if set(state) != STATE_KEYS:
            raise ValueError(
                f"Cannot load optimizer state for {name!r}: it has the keys {sorted(state)}, "
                f"{owner} keeps {sorted(STATE_KEYS)}. The checkpoint was written by another optimizer; "
                "resume with that optimizer, or load only the model weights."
            )
        entry = self._entry(name)
        expected = {"exp_avg": tuple(param.shape), "exp_avg_sq": entry.state_shape()}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"Cannot load optimizer state for {name!r}: {key!r} has shape {list(state[key].shape)}, "
                    f"but this {owner} plan ({entry.kind} blocks) expects {list(shape)}. The checkpoint was "
                    "written with another optimizer or partition; use the same preset and rules."
                )

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
        for group, batch in batches:
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
            )
        return loss


class _Placement(NamedTuple):
    """A parameter's local layout and where its rows live (cached per parameter)."""

    layout: RowLayout
    sharding: ParamSharding
    reduce: bool  # its block means are partial sums that must be all-reduced
    rows: tuple[int, int]  # this rank's rows of the row view


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

    def add(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], placement: _Placement) -> None:
        self.params.append(to_local(param))
        self.grads.append(to_local(grad))
        self.exp_avgs.append(to_local(state["exp_avg"]))
        self.exp_avg_sqs.append(to_local(state["exp_avg_sq"]))
        self.steps.append(state["step"])
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
                    "model.named_parameters(), or groups like {'params': [(name, tensor), ...]}."
                )
            named.append(item)
    return named


def _check_plan_covers(plan: BlockPlan, named: list[tuple[str, torch.Tensor]]) -> None:
    missing = [n for n, _ in named if n not in plan]
    if missing:
        raise ValueError(
            f"The block plan has no entry for {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            "build it from the same model (build_plan(model)) or add rules for these parameters."
        )
    wrong = [(n, list(p.shape), list(plan[n].shape)) for n, p in named if tuple(p.shape) != plan[n].shape]
    if wrong:
        name, got, planned = wrong[0]
        raise ValueError(
            f"The block plan was built for other shapes: {name!r} is {got} but the plan says {planned}; "
            "rebuild the plan from this model."
        )


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
