"""Read a mixture-of-experts module: expert banks (one tensor per projection for all experts) and routers.

transformers 5 stores the experts of a layer as 3-D banks on one ``...Experts`` module that knows
its ``num_experts``: ``gate_up_proj`` ``[E, 2 * inter, hidden]`` and ``down_proj`` ``[E, hidden,
inter]`` used as ``F.linear(x, bank[e])`` (Mixtral, Qwen-MoE, DeepSeek), or transposed ``[E, in,
out]`` used as ``x @ bank[e]`` with ``[E, out]`` bias banks (GPT-OSS; the module says
``is_transposed = True``). A router is a module with ``num_experts`` and a ``weight`` of
``[num_experts, hidden]``: one output row per expert.

A bank's blocks are per expert (``bank_dims=1``), never across experts, so FSDP2's sharding of
dim 0 (whole experts per rank) keeps every block on one rank.

Example::

    >>> usage = describe_expert_parameter((8, 64, 224), experts_module, "down_proj")
    >>> (usage.role, usage.bank_dims, usage.transposed)
    ('mlp', 1, False)
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lightning_lowmem.partition.modules import positive_int

NUM_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclasses.dataclass(frozen=True)
class ExpertParameter:
    """What a parameter of a mixture-of-experts module is.

    Args:
        role: ``"mlp"`` (an expert bank), ``"bias"`` (a bias bank or the router's bias) or
            ``"linear"`` (a router's weight, one row per expert).
        bank_dims: 1 for a bank (dim 0 indexes the experts), 0 for the router.
        transposed: the bank is stored ``[E, in, out]``.
        doubt: why the layout is a guess (warned about); ``None`` when the module says it.
    """

    role: str
    bank_dims: int = 0
    transposed: bool = False
    doubt: str | None = None


def num_experts(module: nn.Module) -> int | None:
    """The module's expert count (``num_experts``, ``num_local_experts``), or ``None``."""
    for attr in NUM_EXPERTS_ATTRS:
        found = positive_int(getattr(module, attr, None))
        if found is not None:
            return found
    return None


def describe_expert_parameter(shape: tuple[int, ...], module: nn.Module, attr: str) -> ExpertParameter | None:
    """Describe ``module.<attr>`` of global ``shape`` if ``module`` is an experts module or a router.

    Returns ``None`` when ``module`` has no expert count or the parameter is not laid out per expert.
    """
    experts = num_experts(module)
    if experts is None or not shape or shape[0] != experts:
        return None
    is_bias = attr == "bias" or attr.endswith("_bias")
    if len(shape) == 3 and not is_bias:
        transposed = getattr(module, "is_transposed", None)
        if isinstance(transposed, bool):
            return ExpertParameter("mlp", bank_dims=1, transposed=transposed)
        doubt = (
            f"expert bank on a {type(module).__name__} that does not say whether it is stored [E, out, in] "
            "or [E, in, out] (no `is_transposed` attribute); read as [E, out, in]"
        )
        return ExpertParameter("mlp", bank_dims=1, doubt=doubt)
    if len(shape) == 2 and is_bias:
        return ExpertParameter("bias", bank_dims=1)
    if len(shape) == 2 and attr == "weight":
        return ExpertParameter("linear")
    if len(shape) == 1 and is_bias:
        return ExpertParameter("bias")
    return None
