"""How many bytes of optimizer state each rank and the whole run hold, by block kind (no Lightning inside).

Bytes are counted by :func:`lightning_lowmem.utils.tensors_bytes` (each piece of memory once). Per
rank, every state tensor this rank holds counts. In total, a sharded state tensor (a ``DTensor``
with a ``Shard`` placement) counts on every rank, and a replicated one (a ``Replicate`` ``DTensor``,
a ``step`` counter, any tensor of a DDP run) counts once: the total is the state's logical size,
what one device would hold, whatever the number of ranks.

Example::

    >>> memory = measure_state_memory(optimizer)
    >>> memory.total_bytes / memory.num_params, memory.saving_percent
    (4.03, 49.6)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_lowmem.callbacks._kinds import kinds_present, param_kinds
from lightning_lowmem.callbacks._reduce import gather_over_group, is_sharded
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM
from lightning_lowmem.utils import state_tensors, tensors_bytes


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

    def table(self) -> str:
        """Per kind: parameters, logical state bytes, bytes per parameter; then the total against AdamW."""
        header = ("kind", "params", "state bytes", "bytes/param")
        rows = [
            (k, f"{self.params_by_kind[k]:,}", f"{self.total_bytes_by_kind[k]:,}",
             f"{self.total_bytes_by_kind[k] / self.params_by_kind[k]:.3f}" if self.params_by_kind[k] else "-")
            for k in self.kinds
        ]
        rows.append(("total", f"{self.num_params:,}", f"{self.total_bytes:,}", f"{self.bytes_per_param:.3f}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"fp32 AdamW {self.adamw_bytes:,} bytes ({ADAMW_STATE_BYTES_PER_PARAM:.2f}/param): "
            f"saving {self.saving_bytes:,} bytes ({self.saving_percent:.1f}%)"
        )
        if len(self.rank_bytes) > 1:
            lines.append("per rank: " + ", ".join(f"{b:,}" for b in self.rank_bytes) + " bytes")
        return "\n".join(lines)


def measure_state_memory(
    optimizers: Optimizer | Iterable[Optimizer],
    peak_memory: int = 0,
    kinds: Mapping[torch.Tensor, str] | None = None,
) -> StateMemory:
    """Measure the state of ``optimizers`` on every rank.

    With an initialized process group this is a collective (one all-gather over all processes):
    every rank must call it.

    Args:
        optimizers: one optimizer or several (their state is added).
        peak_memory: this rank's peak device memory, gathered with the state bytes
            (see :func:`peak_memory_bytes`).
        kinds: ``parameter -> kind``; by default from each optimizer (see
            :func:`~lightning_lowmem.callbacks._kinds.param_kinds`).
    """
    optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
    if kinds is None:
        kinds = {p: k for opt in optimizers for p, k in param_kinds(opt).items()}
    order = kinds_present(kinds.values())
    sharded: dict[str, list[torch.Tensor]] = {k: [] for k in order}
    replicated: dict[str, list[torch.Tensor]] = {k: [] for k in order}
    params_by_kind = dict.fromkeys(order, 0)
    seen: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                kind = kinds[p]
                params_by_kind[kind] += p.numel()  # a DTensor's numel is global
                for tensor in state_tensors(optimizer.state.get(p, {})):
                    (sharded if is_sharded(tensor) else replicated)[kind].append(tensor)
    local = [tensors_bytes(sharded[k]) for k in order] + [tensors_bytes(replicated[k]) for k in order] + [peak_memory]
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
