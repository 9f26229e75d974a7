"""From named parameters to a covering block plan and param groups.

The optimizers over a :class:`~lightning_lowmem.partition.BlockPlan` find each parameter's blocks by
its name, so their param groups hold ``(name, tensor)`` pairs. This module reads those names
(:func:`named_parameters_of`), checks that a plan covers them (:func:`check_plan_covers`), builds
the entries a plan lacks for parameters added later (:func:`plan_missing`, with only the user's
rules that concern them: :func:`rules_for`), and splits parameters into a decayed and a
not-decayed group by their roles (:func:`model_decay_groups`, :func:`decay_groups`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_lowmem.partition import NO_DECAY_ROLES, BlockPlan, ParamBlocks, build_plan, build_plan_from_named_parameters
from lightning_lowmem.partition.build import compile_rules

log = logging.getLogger(__name__)


def named_parameters_of(groups: list[dict[str, Any]], owner: str) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of ``groups``; ``owner`` (the optimizer's name) is in the error.

    Raises:
        ValueError: for a parameter without a name.
    """
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


def rules_for(rules: Any, names: list[str]) -> list[tuple[re.Pattern[str], Any]] | None:
    """The user's rules that match one of ``names`` (a plan of a few parameters must not see the others' rules)."""
    if rules is None:
        return None
    return [(rule.regex, rule.spec) for rule in compile_rules(rules) if any(rule.regex.search(n) for n in names)]


def check_plan_covers(plan: BlockPlan, named: list[tuple[str, torch.Tensor]]) -> None:
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


def plan_missing(
    plan: BlockPlan, named: list[tuple[str, torch.Tensor]], model: nn.Module | None, preset: str, rules: Any
) -> list[ParamBlocks]:
    """The plan entries of the parameters of ``named`` that ``plan`` lacks (``[]`` if none).

    They come from ``model``'s structure (frozen layers included) when the model is known and has
    them, else from their names and shapes (as :func:`build_plan_from_named_parameters`); ``preset``
    and the ``rules`` that match them apply as when ``plan`` was built.
    """
    missing = [(n, p) for n, p in named if n not in plan]
    if not missing:
        return []
    found: list[ParamBlocks] = []
    if model is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the model's fallbacks were reported when first planned
            structural = build_plan(model, preset, rules_for(rules, [n for n, _ in missing]), include_frozen=True)
        found = [structural[n] for n, _ in missing if n in structural]
    rest = [(n, p.shape) for n, p in missing if all(e.name != n and n not in e.aliases for e in found)]
    if rest:
        by_name = build_plan_from_named_parameters(rest, preset, rules_for(rules, [n for n, _ in rest]))
        found += [by_name[n] for n, _ in rest]
    return found


def model_decay_groups(model: nn.Module, no_decay: Sequence[str] = NO_DECAY_ROLES) -> list[dict[str, Any]]:
    """The decayed / not-decayed param groups of ``model``'s trainable parameters, by their roles.

    These are the groups :class:`~lightning_lowmem.optim.block_adam.BlockAdam` builds (roles come
    from the model's structure and do not depend on the preset), with ``(name, parameter)`` pairs so
    a state dict is named.

    Example::

        >>> [len(g["params"]) for g in model_decay_groups(model, ("bias", "norm"))]
        [4, 6]
    """
    with warnings.catch_warnings():  # the plan's block fallbacks are irrelevant here: only roles are read
        warnings.simplefilter("ignore", UserWarning)
        plan = build_plan(model, "adam_mini")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return decay_groups(named, plan, no_decay)


def decay_groups(
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
