r"""``BlockAdam``: AdamW whose second moment is shared within the blocks of a :class:`BlockPlan`.

``AdamMini`` and ``Eve`` are this optimizer with their presets and defaults; the math is in
:mod:`lightning_lowmem.optim.functional`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_lowmem.kernels.dispatch import check_backend
from lightning_lowmem.optim.base import LowMemOptimizer, ParamsLike, param_groups_from
from lightning_lowmem.optim.functional import RowLayout, block_adam, state_dtype
from lightning_lowmem.optim.hparams import check_adam_hparams
from lightning_lowmem.partition import BlockPlan, ParamBlocks, build_plan, build_plan_from_named_parameters

log = logging.getLogger(__name__)

#: Roles that get no weight decay by default (as in nanoGPT and most LLM recipes).
DEFAULT_NO_DECAY = ("bias", "norm", "embedding", "tied_embedding")

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
        backend: ``"auto"``, ``"torch"`` or ``"compile"`` (see :mod:`lightning_lowmem.kernels.dispatch`).

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
        no_decay: Sequence[str] = DEFAULT_NO_DECAY,
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
        self._layouts: dict[torch.Tensor, RowLayout] = {}

    # ---- state ---------------------------------------------------------------------------------

    def _entry(self, name: str) -> ParamBlocks:
        return self.plan[name]

    def _layout(self, name: str, param: torch.Tensor) -> RowLayout:
        layout = self._layouts.get(param)
        if layout is None:
            layout = layout_for(self._entry(name), param.device)
            self._layouts[param] = layout
        return layout

    def _init_group(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], ...]:
        params, grads, exp_avgs, exp_avg_sqs, steps, layouts = [], [], [], [], [], []
        for name, p in zip(group["param_names"], group["params"]):
            grad = self._grad_of(p)
            if grad is None:
                continue
            state = self.state[p]
            if not state:
                entry = self._entry(name)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros(entry.state_shape(), dtype=state_dtype(p), device=p.device)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            layouts.append(self._layout(name, p))
        return params, grads, exp_avgs, exp_avg_sqs, steps, layouts

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
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps, layouts = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            block_adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                layouts,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                backend=self.backend,
            )
        return loss


def layout_for(entry: ParamBlocks, device: torch.device) -> RowLayout:
    """The :class:`RowLayout` of a parameter of the plan, with index tensors on ``device``."""
    if entry.is_full:
        return RowLayout(transposed=entry.transposed, elementwise=True)
    index = entry.group_index(device)
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
