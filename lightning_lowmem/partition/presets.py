"""The presets: for each parameter role, the block kind of its second moment.

=================  ===========  ===============  ======
role               adam_mini    adam_mini_paper  eve
=================  ===========  ===============  ======
query, key         head         head             row
qkv (Q, K, V)      head,head,   head,head,       row
                   row          tensor
value              row          tensor           row
attn_out           row          tensor           row
mlp, linear        row          tensor           row
embedding          row          full             full
output             row          full             row
tied_embedding     row          full             row
bias               full         tensor           full
norm               tensor       tensor           full
conv, other        tensor       tensor           full
=================  ===========  ===============  ======

``adam_mini`` follows the reference implementation (v1.1), ``adam_mini_paper`` the paper's
Algorithms 2-4, ``eve`` gives every weight used as a Linear one value per output row and keeps the
rest elementwise. A ``head`` kind uses the parameter's ``head_dim``; where none is known (the
name-only fallback without ``head_dim``) it becomes ``row``. The parts of a fused projection (Q, K,
V, and MLA's latent, a ``linear`` part) take the kinds of their roles; an expert bank takes its
role's kind per expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from lightning_lowmem.partition.spec import BlockSpec
from lightning_lowmem.partition.structure import ROLES, ParamInfo

Segments = tuple[tuple[BlockSpec, int], ...]

#: Roles of the parts a fused projection is cut into.
PART_ROLES = ("query", "key", "value", "linear")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A role -> block kind table.

    Args:
        name: the preset's name (shown in the plan's title).
        roles: block kind (``"full"``, ``"row"``, ``"head"``, ``"tensor"``) of each role in
            :data:`~lightning_lowmem.partition.structure.ROLES`.

    Raises:
        ValueError: if a role of ``ROLES`` has no kind, or a role a fused projection is cut into
            (``query``, ``key``, ``value``, ``linear``) is ``full``.
    """

    name: str
    roles: Mapping[str, str]

    def __post_init__(self) -> None:
        missing = [role for role in ROLES if role not in self.roles]
        if missing:
            raise ValueError(f"Preset {self.name!r} gives no block kind for the roles {missing}; add them.")
        full = [role for role in PART_ROLES if self.roles[role] == "full"]
        if full:
            raise ValueError(f"Preset {self.name!r}: a part of a fused projection cannot be 'full', got it for {full}.")
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))

    @property
    def qkv(self) -> tuple[str, str, str]:
        """Kinds of the Q, K and V parts of a fused projection."""
        return self.roles["query"], self.roles["key"], self.roles["value"]

    def segments(self, info: ParamInfo) -> Segments:
        """The ``(spec, rows)`` segments of one period of a described parameter under this preset."""
        if info.parts:
            return tuple((_spec(self.roles[part.role], part.head_dim), part.rows) for part in info.parts)
        return ((_spec(self.roles[info.role], info.head_dim), _rows(info)),)


def _spec(kind: str, head_dim: int | None) -> BlockSpec:
    """``BlockSpec(kind)``; a ``head`` kind without a known ``head_dim`` is a ``row``."""
    if kind == "head":
        return BlockSpec("head", head_dim) if head_dim is not None else BlockSpec("row")
    return BlockSpec(kind)


def _rows(info: ParamInfo) -> int:
    """Output rows of one bank of the parameter (``ParamBlocks``' convention: 1 for a 0-dim tensor)."""
    if not info.shape:
        return 1
    return info.shape[-1] if info.transposed else info.shape[info.bank_dims]


def _table(default: str, **kinds: str) -> dict[str, str]:
    """Every role mapped to ``default`` except those given."""
    return {role: kinds.get(role, default) for role in ROLES}


ADAM_MINI = Preset(
    "adam_mini",
    _table("row", query="head", key="head", bias="full", norm="tensor", conv="tensor", other="tensor"),
)
ADAM_MINI_PAPER = Preset(
    "adam_mini_paper",
    _table("tensor", query="head", key="head", embedding="full", output="full", tied_embedding="full"),
)
EVE = Preset(
    "eve",
    _table("full", query="row", key="row", value="row", qkv="row", attn_out="row", mlp="row", linear="row",
           output="row", tied_embedding="row"),
)

#: The presets by name.
PRESET_TABLES: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (ADAM_MINI, ADAM_MINI_PAPER, EVE)})
