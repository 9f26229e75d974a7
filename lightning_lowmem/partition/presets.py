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
name-only fallback without ``head_dim``) it becomes ``row``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from lightning_lowmem.partition.spec import BlockSpec
from lightning_lowmem.partition.structure import ROLES, ParamInfo

Segments = tuple[tuple[BlockSpec, int], ...]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A role -> block kind table.

    Args:
        name: the preset's name (shown in the plan's title).
        roles: block kind (``"full"``, ``"row"``, ``"head"``, ``"tensor"``) of each role in
            :data:`~lightning_lowmem.partition.structure.ROLES`.
        qkv: kinds of the Q, K and V segments of a fused projection.

    Raises:
        ValueError: if a role of ``ROLES`` has no kind, or ``qkv`` puts ``full`` on one segment.
    """

    name: str
    roles: Mapping[str, str]
    qkv: tuple[str, str, str]

    def __post_init__(self) -> None:
        missing = [role for role in ROLES if role not in self.roles]
        if missing:
            raise ValueError(f"Preset {self.name!r} gives no block kind for the roles {missing}; add them.")
        if "full" in self.qkv:
            raise ValueError(f"Preset {self.name!r}: a fused QKV segment cannot be 'full', got {self.qkv}.")
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))

    def segments(self, info: ParamInfo) -> Segments:
        """The ``(spec, rows)`` segments of a described parameter under this preset."""
        if info.role == "qkv" and info.qkv_rows is not None:
            return tuple((_spec(kind, info.head_dim), rows) for kind, rows in zip(self.qkv, info.qkv_rows, strict=True))
        return ((_spec(self.roles[info.role], info.head_dim), _rows(info)),)


def _spec(kind: str, head_dim: int | None) -> BlockSpec:
    """``BlockSpec(kind)``; a ``head`` kind without a known ``head_dim`` is a ``row``."""
    if kind == "head":
        return BlockSpec("head", head_dim) if head_dim is not None else BlockSpec("row")
    return BlockSpec(kind)


def _rows(info: ParamInfo) -> int:
    """Output rows of the parameter (``ParamBlocks``' convention: 1 for a 0-dim tensor)."""
    if not info.shape:
        return 1
    return info.shape[1] if info.transposed else info.shape[0]


def _table(default: str, **kinds: str) -> dict[str, str]:
    """Every role mapped to ``default`` except those given."""
    return {role: kinds.get(role, default) for role in ROLES}


ADAM_MINI = Preset(
    "adam_mini",
    _table("row", query="head", key="head", bias="full", norm="tensor", conv="tensor", other="tensor"),
    qkv=("head", "head", "row"),
)
ADAM_MINI_PAPER = Preset(
    "adam_mini_paper",
    _table("tensor", query="head", key="head", embedding="full", output="full", tied_embedding="full"),
    qkv=("head", "head", "tensor"),
)
EVE = Preset(
    "eve",
    _table("full", query="row", key="row", value="row", qkv="row", attn_out="row", mlp="row", linear="row",
           output="row", tied_embedding="row"),
    qkv=("row", "row", "row"),
)

#: The presets by name.
PRESET_TABLES: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (ADAM_MINI, ADAM_MINI_PAPER, EVE)})
