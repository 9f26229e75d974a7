"""A block plan: the block layout of every trainable parameter of a model, and its memory table.

Example::

    >>> plan = build_plan(model, preset="adam_mini")
    >>> print(plan)                     # blocks per kind, parameters, state bytes vs AdamW
    >>> plan["blocks.0.attn.c_attn.weight"].kind
    'mixed'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from lightning_lowmem.partition.spec import KINDS, ParamBlocks

#: Bytes per parameter of fp32 AdamW state (``exp_avg`` and ``exp_avg_sq``).
ADAMW_STATE_BYTES_PER_PARAM = 8


class BlockPlan(Mapping[str, ParamBlocks]):
    """Maps fully-qualified parameter names to their :class:`ParamBlocks`.

    Tied weights have one entry (under the first name ``named_parameters()`` gives); their other
    names resolve to the same entry through ``plan[alias]``.

    Args:
        entries: the per-parameter layouts.
        preset: the preset the plan was built from (for the table's title).
    """

    def __init__(self, entries: list[ParamBlocks] | tuple[ParamBlocks, ...], preset: str = "custom") -> None:
        self.preset = preset
        self._entries: dict[str, ParamBlocks] = {}
        self._aliases: dict[str, str] = {}
        for entry in entries:
            if entry.name in self._entries or entry.name in self._aliases:
                raise ValueError(f"Parameter {entry.name!r} appears twice in the block plan.")
            self._entries[entry.name] = entry
            for alias in entry.aliases:
                self._aliases[alias] = entry.name

    def __getitem__(self, name: str) -> ParamBlocks:
        if name in self._entries:
            return self._entries[name]
        if name in self._aliases:
            return self._entries[self._aliases[name]]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_params(self) -> int:
        """Trainable parameters, a tied weight counted once."""
        return sum(entry.numel for entry in self._entries.values())

    def state_bytes(self, state_dtype_bytes: int = 4) -> int:
        """Bytes of ``exp_avg`` plus ``exp_avg_sq`` at ``state_dtype_bytes`` per entry."""
        return state_dtype_bytes * sum(entry.numel + entry.state_numel for entry in self._entries.values())

    def rows_by_kind(self) -> dict[str, tuple[int, int, int]]:
        """``kind -> (blocks, parameters, v entries)``, summed over all segments."""
        totals: dict[str, list[int]] = {}
        for entry in self._entries.values():
            for kind, counts in entry.counts_by_kind().items():
                acc = totals.setdefault(kind, [0, 0, 0])
                for i, c in enumerate(counts):
                    acc[i] += c
        return {kind: tuple(totals[kind]) for kind in KINDS if kind in totals}

    def summary(self) -> str:
        """The plan as a table: per kind, blocks, parameters, ``v`` entries and fp32 state bytes."""
        by_kind = self.rows_by_kind()
        totals = tuple(sum(counts[i] for counts in by_kind.values()) for i in range(3))
        header = ("kind", "blocks", "params", "v entries", "state MB", "bytes/param")
        rows = [_summary_row(kind, *counts) for kind, counts in by_kind.items()]
        rows.append(_summary_row("total", *totals))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        state, adamw = self.state_bytes(), ADAMW_STATE_BYTES_PER_PARAM * self.num_params
        saving = 1 - state / adamw if adamw else 0.0
        return "\n".join(
            [f"Block plan ({self.preset}): {len(self._entries)} tensors", line(header), "  ".join("-" * w for w in widths)]
            + [line(r) for r in rows]
            + [f"fp32 AdamW state {adamw / 1e6:.2f} MB -> {state / 1e6:.2f} MB ({saving:.1%} saved)"]
        )

    def details(self) -> str:
        """One line per parameter: name, shape, role and spec of each segment (``spec x rows``; a
        repeating pattern as ``[...] xN``; ``per slice of [E]`` for the experts of a bank)."""
        lines = []
        for entry in self._entries.values():
            fused = len(entry.segments) > 1 or entry.repeat > 1
            segs = " | ".join(f"{spec}x{rows}" if fused else str(spec) for spec, rows in entry.segments)
            if entry.repeat > 1:
                segs = f"[{segs}] x{entry.repeat}"
            banks = f" per slice of {list(entry.shape[: entry.bank_dims])}" if entry.bank_dims and not entry.is_full else ""
            tied = f" (tied: {', '.join(entry.aliases)})" if entry.aliases else ""
            t = " transposed" if entry.transposed else ""
            lines.append(f"{entry.name}  {list(entry.shape)}  {entry.role}  {segs}{banks}{t}{tied}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"BlockPlan(preset={self.preset!r}, tensors={len(self._entries)}, params={self.num_params:,})"


def _summary_row(kind: str, blocks: int, params: int, v_entries: int) -> tuple[str, ...]:
    state = 4 * (params + v_entries)
    per_param = f"{state / params:.3f}" if params else "-"
    return (kind, f"{blocks:,}", f"{params:,}", f"{v_entries:,}", f"{state / 1e6:.2f}", per_param)
