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
Interleaved and grouped layouts are a *pattern*: the segments describe one period of rows, repeated
``repeat`` times (GPT-NeoX's ``[heads, 3, head_dim]`` is the period ``Q, K, V`` of ``head_dim`` rows
each, repeated ``heads`` times). Parameters of any rank have leading *bank* dims whose slices never
share a block (the experts of a ``[E, out, in]`` bank, the leading 1 of a ``[1, N, D]`` table).

Example::

    >>> spec = BlockSpec.parse("head:64")
    >>> spec.num_blocks(rows=768)
    12
    >>> neox = ParamBlocks("qkv", (3 * 768, 768), ((spec, 64), (spec, 64), (BlockSpec("row"), 64)), repeat=12)
    >>> neox.state_numel                      # 12 Q heads, 12 K heads, 768 V rows
    792
    >>> bank = ParamBlocks.single("experts.down_proj", (8, 4096, 14336), BlockSpec("row"), bank_dims=1)
    >>> bank.state_shape()                    # one value per output row of each expert
    (8, 4096)
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
        segments: ``(spec, rows)`` pairs covering one period of rows in order; one pair for most
            parameters.
        transposed: the output rows are the last dim (GPT-2's ``Conv1D`` stores ``[in, out]``,
            GPT-OSS's expert banks ``[E, in, out]``).
        role: what the parameter is (``"query"``, ``"mlp"``, ``"norm"``, ``"bias"``, ...), used
            for weight-decay groups and the plan table.
        aliases: other names of the same tensor (tied weights).
        repeat: the segments are one period, repeated this many times over the rows of a bank; a
            ``tensor`` segment is one block over all its periods, ``row``/``head`` blocks are new
            in each period.
        bank_dims: leading dims whose slices (experts) are independent: the layout applies to
            each slice and no block spans two. The rows are the next dim (the last when
            ``transposed``); the dims after the rows are reduced.

    Raises:
        ValueError: if the segments do not cover the rows or a ``head_dim`` does not divide them.
    """

    name: str
    shape: tuple[int, ...]
    segments: tuple[tuple[BlockSpec, int], ...]
    transposed: bool = False
    role: str = "other"
    aliases: tuple[str, ...] = ()
    repeat: int = 1
    bank_dims: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.transposed and len(self.shape) != self.bank_dims + 2:
            raise ValueError(
                f"{self.name}: only 2-D weights (after {self.bank_dims} bank dims) can be transposed, "
                f"got shape {self.shape}."
            )
        if not 0 <= self.bank_dims < max(len(self.shape), 1) or (self.bank_dims and not self.shape):
            raise ValueError(f"{self.name}: bank_dims={self.bank_dims} leaves no row dim in shape {list(self.shape)}.")
        if not isinstance(self.repeat, int) or self.repeat < 1:
            raise ValueError(f"{self.name}: repeat must be a positive integer, got {self.repeat!r}.")
        covered = sum(rows for _, rows in self.segments) * self.repeat
        if covered != self.bank_rows:
            times = f" x {self.repeat} periods" if self.repeat > 1 else ""
            raise ValueError(
                f"{self.name}: segments cover {covered // self.repeat} rows{times} but the parameter has "
                f"{self.bank_rows} (shape {list(self.shape)}, transposed={self.transposed}, bank_dims={self.bank_dims})."
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
        rows = _rows_of(shape, kwargs.get("transposed", False), kwargs.get("bank_dims", 0))
        return cls(name, shape, ((spec, rows),), **kwargs)

    @property
    def banks(self) -> int:
        """Independent slices (experts): the product of the bank dims, 1 without them."""
        return math.prod(self.shape[: self.bank_dims])

    @property
    def bank_rows(self) -> int:
        """Output rows of one bank."""
        return _rows_of(self.shape, self.transposed, self.bank_dims)

    @property
    def rows(self) -> int:
        """Output rows of the whole parameter (all banks): the rows of its ``rows x cols`` view."""
        return self.banks * self.bank_rows

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
        return sum(counts[2] for counts in self.counts_by_kind().values())

    def state_shape(self) -> tuple[int, ...]:
        """Shape of ``v``: the parameter's shape for ``full``, else ``(*bank dims, blocks per bank)``
        (a bank's blocks stay with it when FSDP2 shards the bank dim)."""
        if self.is_full:
            return self.shape
        return (*self.shape[: self.bank_dims], self.state_numel // self.banks)

    def _segment_blocks(self, spec: BlockSpec, rows: int) -> int:
        """Blocks of one segment over all its periods in one bank (a ``tensor`` segment is one block)."""
        return 1 if spec.kind == "tensor" else self.repeat * spec.num_blocks(rows, self.cols)

    def counts_by_kind(self) -> dict[str, tuple[int, int, int]]:
        """``kind -> (blocks, parameters, v entries)`` over the segments, periods and banks."""
        out: dict[str, tuple[int, int, int]] = {}
        for spec, rows in self.segments:
            blocks = self.rows * self.cols if spec.kind == "full" else self.banks * self._segment_blocks(spec, rows)
            params = self.banks * self.repeat * rows * self.cols
            b, p, v = out.get(spec.kind, (0, 0, 0))
            out[spec.kind] = (b + blocks, p + params, v + blocks)
        return out

    def _bank_blocks(self) -> tuple[list[int], list[int], list[str]]:
        """For one bank: the block of each row, the rows of each block and its kind. Blocks are
        numbered in the order of their first row, so a layout without shared ``tensor`` segments
        numbers its blocks in row order."""
        index: list[int] = []
        sizes: list[int] = []
        kinds: list[str] = []
        shared: dict[int, int] = {}
        for _ in range(self.repeat):
            for position, (spec, rows) in enumerate(self.segments):
                if spec.kind == "tensor":
                    if position not in shared:
                        shared[position] = len(sizes)
                        sizes.append(0)
                        kinds.append("tensor")
                    index.extend([shared[position]] * rows)
                    sizes[shared[position]] += rows
                    continue
                per_block = spec.head_dim if spec.kind == "head" else 1
                for _ in range(rows // per_block):
                    index.extend([len(sizes)] * per_block)
                    sizes.append(per_block)
                    kinds.append(spec.kind)
        return index, sizes, kinds

    def block_kinds(self) -> list[str]:
        """The kind of each entry of ``v`` in the order ``v`` holds them (banks first; not defined for
        ``full``). With a pattern the kinds interleave: ``[head, head, row x head_dim] x heads``."""
        if self.is_full:
            raise ValueError(f"{self.name}: a 'full' parameter has no row groups.")
        return self._bank_blocks()[2] * self.banks

    def kind_runs(self) -> list[tuple[str, int, int]]:
        """``v`` in its order as runs of one kind: ``[(kind, parameters, v entries), ...]``.

        A ``full`` parameter is one run; GPT-2's ``c_attn`` (Q and K by head, V by row) is
        ``[("head", 2 * rows * cols / 3, 2 * heads), ("row", rows * cols / 3, rows / 3)]``; an
        interleaved layout alternates its runs head by head, and a bank repeats its runs per bank.
        """
        if self.kind != "mixed":
            return [(self.kind, self.numel, self.state_numel)]
        runs: list[tuple[str, int, int]] = []
        for kind, rows in zip(self.block_kinds(), self.group_sizes()):
            if runs and runs[-1][0] == kind:
                _, numel, entries = runs[-1]
                runs[-1] = (kind, numel + rows * self.cols, entries + 1)
            else:
                runs.append((kind, rows * self.cols, 1))
        return runs

    def group_sizes(self) -> list[int]:
        """Rows in each second-moment group, in block order (not defined for ``full``)."""
        if self.is_full:
            raise ValueError(f"{self.name}: a 'full' parameter has no row groups.")
        return self._bank_blocks()[1] * self.banks

    def group_index(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """For each row of the ``rows x cols`` view (banks first), the index of its second-moment
        group; ``None`` when every row is its own group, in order."""
        if self.is_full:
            raise ValueError(f"{self.name}: a 'full' parameter has no row groups.")
        index, sizes, _ = self._bank_blocks()
        if len(sizes) == self.bank_rows:
            return None
        bank = torch.tensor(index, device=device)
        offsets = torch.arange(self.banks, device=device).unsqueeze(1) * len(sizes)
        return (bank.unsqueeze(0) + offsets).reshape(-1)


def _rows_of(shape: tuple[int, ...], transposed: bool, bank_dims: int = 0) -> int:
    if len(shape) == 0:
        return 1
    return shape[-1] if transposed else shape[bank_dims]
