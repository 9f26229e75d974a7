"""How many bytes of optimizer state each rank and the whole run hold, by block kind (no Lightning inside).

Bytes are counted by :func:`lightning_lowmem.utils.tensors_bytes` (each piece of memory once). Per
rank, every state tensor this rank holds counts. In total, a sharded state tensor (a ``DTensor``
with a ``Shard`` placement) counts on every rank, and a replicated one (a ``Replicate`` ``DTensor``,
a ``step`` counter, any tensor of a DDP run) counts once: the total is the state's logical size,
what one device would hold, whatever the number of ranks.

Bytes and parameters are counted by block kind as the optimizer describes its state
(:func:`~lightning_lowmem.callbacks.core.kinds.state_segments`): a fused parameter whose segments
differ (GPT-2's ``c_attn``: Q and K by ``head``, V by ``row``) is split over its segments, each
state tensor by the segments' ``v`` entries if it has one value per entry, else by their
parameters, so the counts per kind are those of the block plan's table.

Example::

    >>> memory = measure_state_memory(optimizer)
    >>> memory.total_bytes / memory.num_params, memory.saving_percent
    (4.03, 49.6)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch.optim import Optimizer

from lightning_lowmem.callbacks.core.kinds import Segment, kinds_present, state_segments
from lightning_lowmem.callbacks.core.reduce import gather_over_group, is_sharded
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM
from lightning_lowmem.utils import state_tensors, tensors_bytes

#: Bytes in an MB, as the charts and tables give them.
MB = 1e6


@dataclasses.dataclass(frozen=True)
class StateMemory:
    """Optimizer state bytes of a run.

    Args:
        kinds: the block kinds, in the order of the per-kind fields.
        rank_bytes: state bytes held by each rank.
        rank_bytes_by_kind: ``kind -> bytes held by each rank``.
        total_bytes: the state's logical size (shards of all ranks, replicated tensors once).
        total_bytes_by_kind: ``kind -> logical bytes``.
        num_params: parameters updated (global shapes, a tied weight once).
        params_by_kind: ``kind -> parameters``.
        peak_memory: each rank's peak device memory (CUDA allocator; process RSS on CPU).

    ``*_mb`` properties give the same figures in MB (1e6 bytes), as the charts show them.
    """

    kinds: tuple[str, ...]
    rank_bytes: tuple[int, ...]
    rank_bytes_by_kind: dict[str, tuple[int, ...]]
    total_bytes: int
    total_bytes_by_kind: dict[str, int]
    num_params: int
    params_by_kind: dict[str, int]
    peak_memory: tuple[int, ...]

    @property
    def adamw_bytes(self) -> int:
        """fp32 AdamW's state for the same parameters (``exp_avg`` and ``exp_avg_sq``, 8 bytes each)."""
        return ADAMW_STATE_BYTES_PER_PARAM * self.num_params

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.num_params if self.num_params else 0.0

    @property
    def saving_bytes(self) -> int:
        """Bytes saved against fp32 AdamW (negative if the state is larger)."""
        return self.adamw_bytes - self.total_bytes

    @property
    def saving_percent(self) -> float:
        return 100.0 * self.saving_bytes / self.adamw_bytes if self.adamw_bytes else 0.0

    @property
    def total_mb(self) -> float:
        """``total_bytes`` in MB."""
        return self.total_bytes / MB

    @property
    def adamw_mb(self) -> float:
        """``adamw_bytes`` in MB."""
        return self.adamw_bytes / MB

    @property
    def saving_mb(self) -> float:
        """``saving_bytes`` in MB."""
        return self.saving_bytes / MB

    def table(self) -> str:
        """Per kind: parameters, measured state MB, bytes per parameter; then the total against fp32 AdamW.

        The kinds and parameter counts are those of the block plan's table; the state is measured
        (so it includes what a plan does not count, such as each parameter's ``step``).
        """
        header = ("kind", "params", "state MB", "bytes/param")
        rows = [
            (k, f"{self.params_by_kind[k]:,}", f"{self.total_bytes_by_kind[k] / MB:.3f}",
             f"{self.total_bytes_by_kind[k] / self.params_by_kind[k]:.3f}" if self.params_by_kind[k] else "-")
            for k in self.kinds
        ]
        rows.append(("total", f"{self.num_params:,}", f"{self.total_mb:.3f}", f"{self.bytes_per_param:.3f}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"fp32 AdamW {self.adamw_mb:.3f} MB ({ADAMW_STATE_BYTES_PER_PARAM:.2f} bytes/param): "
            f"saving {self.saving_mb:.3f} MB ({self.saving_percent:.1f}%)"
        )
        if len(self.rank_bytes) > 1:
            lines.append("per rank: " + ", ".join(f"{b / MB:.3f}" for b in self.rank_bytes) + " MB")
        return "\n".join(lines)


def measure_state_memory(
    optimizers: Optimizer | Iterable[Optimizer],
    peak_memory: int = 0,
    segments: Mapping[torch.Tensor, Sequence[Segment]] | None = None,
) -> StateMemory:
    """Measure the state of ``optimizers`` on every rank.

    With an initialized process group this is a collective (one all-gather over all processes):
    every rank must call it.

    Args:
        optimizers: one optimizer or several (their state is added).
        peak_memory: this rank's peak device memory, gathered with the state bytes
            (see :func:`peak_memory_bytes`).
        segments: ``parameter -> segments``; by default as each optimizer describes them (see
            :func:`~lightning_lowmem.callbacks.core.kinds.state_segments`).
    """
    optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
    if segments is None:
        segments = {p: segs for opt in optimizers for p, segs in state_segments(opt).items()}
    order = kinds_present(s.kind for segs in segments.values() for s in segs)
    index = {k: i for i, k in enumerate(order)}
    sharded: dict[str, list[torch.Tensor]] = {k: [] for k in order}
    replicated: dict[str, list[torch.Tensor]] = {k: [] for k in order}
    split = [0] * (2 * len(order))  # bytes of fused parameters' state, split over their segments
    params_by_kind = dict.fromkeys(order, 0)
    seen: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                segs = segments[p]
                for seg in segs:
                    params_by_kind[seg.kind] += seg.numel  # global counts
                for tensor in state_tensors(optimizer.state.get(p, {})):
                    if len(segs) == 1:
                        (sharded if is_sharded(tensor) else replicated)[segs[0].kind].append(tensor)
                        continue
                    offset = 0 if is_sharded(tensor) else len(order)
                    for seg, nbytes in zip(segs, _split_bytes(tensor, segs)):
                        split[offset + index[seg.kind]] += nbytes
    local = [tensors_bytes(sharded[k]) + split[i] for i, k in enumerate(order)]
    local += [tensors_bytes(replicated[k]) + split[len(order) + i] for i, k in enumerate(order)] + [peak_memory]
    per_rank = gather_over_group(torch.tensor(local, dtype=torch.int64)).tolist()
    n = len(order)
    rank_by_kind = {k: tuple(row[i] + row[n + i] for row in per_rank) for i, k in enumerate(order)}
    total_by_kind = {k: sum(row[i] for row in per_rank) + per_rank[0][n + i] for i, k in enumerate(order)}
    return StateMemory(
        kinds=order,
        rank_bytes=tuple(sum(rank_by_kind[k][r] for k in order) for r in range(len(per_rank))),
        rank_bytes_by_kind=rank_by_kind,
        total_bytes=sum(total_by_kind.values()),
        total_bytes_by_kind=total_by_kind,
        num_params=sum(params_by_kind.values()),
        params_by_kind=params_by_kind,
        peak_memory=tuple(row[-1] for row in per_rank),
    )


def _split_bytes(tensor: torch.Tensor, segments: Sequence[Segment]) -> list[int]:
    """The bytes of ``tensor`` (one state tensor of a fused parameter) that belong to each segment."""
    entries = sum(s.entries for s in segments)
    weights = [s.entries for s in segments] if tensor.numel() == entries else [s.numel for s in segments]
    nbytes, total = tensors_bytes([tensor]), sum(weights)
    shares = [nbytes * w // total for w in weights] if total else [0] * len(weights)
    shares[-1] += nbytes - sum(shares)
    return shares


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA caching allocator's peak on a CUDA device, else peak RSS (0 on Windows)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return 0
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)
