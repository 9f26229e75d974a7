"""Block specifications: how the second moment of one parameter is shared.

Every parameter is viewed as a matrix of ``rows x cols``: rows are the output dimension (dim 0 of a
``nn.Linear`` weight, dim 1 of GPT-2's transposed ``Conv1D`` weight), columns are everything else.
A *block* is a set of entries that share one second-moment value ``v``:

============  ============================================  ==========================
kind          one ``v`` per                                 ``v`` entries
============  ============================================  ==========================
``full``      entry (elementwise, exactly AdamW)            ``rows * cols``
``row``       output row                                    ``rows``
``head``      attention head (``head_dim`` adjacent rows)   ``rows / head_dim``
``tensor``    (part of a) tensor                            ``1``
============  ============================================  ==========================

Fused projections (``in_proj_weight``, ``c_attn``, ``qkv``) are split along their rows into
*segments* (Q, K, V), each with its own spec; a ``full`` spec always covers a whole parameter.

Example::

    >>> spec = BlockSpec.parse("head:64")
    >>> spec.num_blocks(rows=768)
    12
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

KINDS = ("full", "row", "head", "tensor")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """The sharing rule for (a row segment of) one parameter.

    Args:
        kind: ``"full"``, ``"row"``, ``"head"`` or ``"tensor"``.
        head_dim: rows per head; required for ``"head"``, not allowed otherwise.

    Raises:
        ValueError: for an unknown kind or a missing/invalid ``head_dim``.
    """

    kind: str
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown block kind {self.kind!r}; choose one of {', '.join(KINDS)}.")
        if self.kind == "head":
            if not isinstance(self.head_dim, int) or self.head_dim < 1:
                raise ValueError(
                    f"A 'head' block needs a positive integer head_dim, got {self.head_dim!r}; "
                    "write it as 'head:64' or BlockSpec('head', head_dim=64)."
                )
        elif self.head_dim is not None:
            raise ValueError(f"head_dim is only meaningful for 'head' blocks, got it for {self.kind!r}.")

    @classmethod
    def parse(cls, value: Any) -> BlockSpec:
        """Build a spec from a ``BlockSpec``, ``"row"``, ``"head:64"`` or ``{"kind": ..., "head_dim": ...}``."""
        if isinstance(value, BlockSpec):
            return value
        if isinstance(value, str):
            kind, sep, head_dim = value.partition(":")
            if not sep:
                return cls(kind.strip())
            try:
                return cls(kind.strip(), int(head_dim))
            except ValueError as err:
                if kind.strip() != "head" or not head_dim.strip().isdigit():
                    raise ValueError(
                        f"Cannot read block spec {value!r}: write a kind ({', '.join(KINDS)}) "
                        "or 'head:<head_dim>'."
                    ) from err
                raise
        if isinstance(value, Mapping):
            unknown = set(value) - {"kind", "head_dim"}
            if unknown or "kind" not in value:
                raise ValueError(
                    f"A block spec mapping takes the keys 'kind' and 'head_dim', got {sorted(value)}."
                )
            return cls(str(value["kind"]), value.get("head_dim"))
        raise ValueError(f"Cannot read block spec {value!r} of type {type(value).__name__}.")

    def num_blocks(self, rows: int, cols: int = 1) -> int:
        """Second-moment entries this spec keeps for ``rows x cols`` entries.

        Raises:
            ValueError: if ``head_dim`` does not divide ``rows``.
        """
        if self.kind == "full":
            return rows * cols
        if self.kind == "row":
            return rows
        if self.kind == "tensor":
            return 1
        if rows % self.head_dim:
            raise ValueError(f"head_dim={self.head_dim} does not divide the {rows} rows of this block.")
        return rows // self.head_dim

    def __str__(self) -> str:
        return f"head:{self.head_dim}" if self.kind == "head" else self.kind


@dataclasses.dataclass(frozen=True)
class ParamBlocks:
    """The block layout of one parameter, decided from its *global* shape.

    Args:
        name: fully-qualified parameter name (the first one, for tied weights).
        shape: the global shape (a DTensor's ``.shape``, a meta tensor's shape).
        segments: ``(spec, rows)`` pairs covering the rows in order; one pair for most parameters.
        transposed: the output rows are dim 1 (GPT-2's ``Conv1D`` stores ``[in, out]``).
        role: what the parameter is (``"query"``, ``"mlp"``, ``"norm"``, ``"bias"``, ...), used
            for weight-decay groups and the plan table.
        aliases: other names of the same tensor (tied weights).

    Raises:
        ValueError: if the segments do not cover the rows or a ``head_dim`` does not divide them.
    """

    name: str
    shape: tuple[int, ...]
    segments: tuple[tuple[BlockSpec, int], ...]
    transposed: bool = False
    role: str = "other"
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.transposed and len(self.shape) != 2:
            raise ValueError(f"{self.name}: only 2-D weights can be transposed, got shape {self.shape}.")
        covered = sum(rows for _, rows in self.segments)
        if covered != self.rows:
            raise ValueError(
                f"{self.name}: segments cover {covered} rows but the parameter has {self.rows} "
                f"(shape {list(self.shape)}, transposed={self.transposed})."
            )
        kinds = {spec.kind for spec, _ in self.segments}
        if "full" in kinds and len(self.segments) > 1:
            raise ValueError(f"{self.name}: a 'full' spec must cover the whole parameter, not one segment.")
        for spec, rows in self.segments:
            try:
                spec.num_blocks(rows, self.cols)
            except ValueError as err:
                raise ValueError(f"{self.name} (shape {list(self.shape)}): {err}") from None

    @classmethod
    def single(cls, name: str, shape: Any, spec: BlockSpec, **kwargs: Any) -> ParamBlocks:
        """A parameter with one spec over all its rows."""
        shape = tuple(int(s) for s in shape)
        transposed = kwargs.get("transposed", False)
        rows = _rows_of(shape, transposed)
        return cls(name, shape, ((spec, rows),), **kwargs)

    @property
    def rows(self) -> int:
        return _rows_of(self.shape, self.transposed)

    @property
    def cols(self) -> int:
        return math.prod(self.shape) // self.rows if self.rows else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> str:
        """The kind of every segment, or ``"mixed"`` when the segments differ."""
        kinds = {spec.kind for spec, _ in self.segments}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def is_full(self) -> bool:
        return self.segments[0][0].kind == "full"

    @property
    def state_numel(self) -> int:
        """Entries of the second moment ``v``."""
        return sum(spec.num_blocks(rows, self.cols) for spec, rows in self.segments)

    def state_shape(self) -> tuple[int, ...]:
        """Shape of ``v``: the parameter's shape for ``full``, else ``(num_blocks,)``."""
        return self.shape if self.is_full else (self.state_numel,)

    def counts_by_kind(self) -> dict[str, tuple[int, int, int]]:
        """``kind -> (blocks, parameters, v entries)`` over the segments."""
        out: dict[str, tuple[int, int, int]] = {}
        for spec, rows in self.segments:
            blocks = spec.num_blocks(rows, self.cols)
            b, p, v = out.get(spec.kind, (0, 0, 0))
            out[spec.kind] = (b + blocks, p + rows * self.cols, v + blocks)
        return out

    def group_sizes(self) -> list[int]:
        """Rows in each second-moment group, in row order (not defined for ``full``)."""
        if self.is_full:
            raise ValueError(f"{self.name}: a 'full' parameter has no row groups.")
        sizes: list[int] = []
        for spec, rows in self.segments:
            if spec.kind == "row":
                sizes.extend([1] * rows)
            elif spec.kind == "head":
                sizes.extend([spec.head_dim] * (rows // spec.head_dim))
            else:
                sizes.append(rows)
        return sizes

    def group_index(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """For each row, the index of its second-moment group; ``None`` when every row is its own group."""
        sizes = self.group_sizes()
        if len(sizes) == self.rows:
            return None
        return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def _rows_of(shape: tuple[int, ...], transposed: bool) -> int:
    if len(shape) == 0:
        return 1
    return shape[1] if transposed else shape[0]
