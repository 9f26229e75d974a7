"""What a module is: Linear-like, norm, attention head counts, and the parts of a projection's rows.

Small predicates over ``nn.Module`` objects shared by the structure readers
(:mod:`~lightning_lowmem.partition.attention`, :mod:`~lightning_lowmem.partition.moe`,
:mod:`~lightning_lowmem.partition.structure`). Only global shapes are read, never values.
``fully_shard`` swaps a module's class for an ``FSDP<Name>`` subclass, so class names are matched
along the MRO.

Example::

    >>> counts = find_head_counts(model.model.layers[0].self_attn)
    >>> (counts.num_heads, counts.num_kv_heads, counts.head_dim)
    (32, 8, 128)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

# Attribute names that carry head counts, looked up on the attention module, then on a `config`.
HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")
NUM_HEADS_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead")
NUM_KV_HEADS_ATTRS = ("num_key_value_heads", "n_kv_head", "n_kv_heads", "num_kv_heads")

NORM_CLASS_PATTERN = re.compile(r"Norm(\dd)?$")

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclasses.dataclass(frozen=True)
class HeadCounts:
    """Attention head counts found on a module or its config; ``None`` where not found."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class Part:
    """A run of rows of one role inside one period of a projection's rows.

    Args:
        role: ``"query"``, ``"key"``, ``"value"`` or ``"linear"`` (a latent with no heads).
        rows: rows of this part in one period.
        head_dim: rows per head, for ``query`` and ``key``.
    """

    role: str
    rows: int
    head_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class Projection:
    """The rows of one projection: ``parts`` in order, the whole pattern repeated ``repeat`` times.

    GPT-NeoX's ``query_key_value`` is ``Projection((Part("query", d, d), Part("key", d, d),
    Part("value", d)), repeat=heads)``; a ``q_proj`` is one ``query`` part.
    """

    parts: tuple[Part, ...]
    repeat: int = 1

    @property
    def rows(self) -> int:
        return self.repeat * sum(part.rows for part in self.parts)


def class_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the module's class and its bases (robust to FSDP2's ``FSDP<Name>`` classes)."""
    return tuple(cls.__name__ for cls in type(module).__mro__)


def is_conv1d_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight stored ``[in, out]``, ``nf`` outputs)."""
    return "Conv1D" in class_names(module) and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or transformers' transposed ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d_transposed(module)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's norm classes or any class named ``...Norm`` (``LlamaRMSNorm``)."""
    return isinstance(module, NORM_TYPES) or any(NORM_CLASS_PATTERN.search(n) for n in class_names(module))


def output_rows(module: nn.Module) -> int | None:
    """Output features of a Linear-like module from its weight's global shape."""
    weight = getattr(module, "weight", None)
    if weight is None or len(weight.shape) != 2:
        return None
    return int(weight.shape[1] if is_conv1d_transposed(module) else weight.shape[0])


def positive_int(value: Any) -> int | None:
    """``value`` if it is a positive int (not a bool), else ``None``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def lookup(objects: Sequence[Any], attrs: Iterable[str]) -> int | None:
    """The first positive-int attribute among ``attrs``, trying each object in order."""
    for obj in objects:
        for attr in attrs:
            found = positive_int(getattr(obj, attr, None))
            if found is not None:
                return found
    return None


def find_head_counts(module: nn.Module, ancestors: Sequence[nn.Module] = ()) -> HeadCounts:
    """Head counts from ``module``'s attributes, then the ``config`` of it or its nearest ancestor.

    Args:
        module: the attention module (the parent of ``q_proj``/``c_attn``, or an
            ``nn.MultiheadAttention``).
        ancestors: its ancestors, nearest first; the first one with a ``config`` is consulted.
    """
    config = next((m.config for m in (module, *ancestors) if getattr(m, "config", None) is not None), None)
    sources = (module,) if config is None else (module, config)
    return HeadCounts(
        num_heads=lookup(sources, NUM_HEADS_ATTRS),
        num_kv_heads=lookup(sources, NUM_KV_HEADS_ATTRS),
        head_dim=lookup(sources, HEAD_DIM_ATTRS),
    )


def resolve_head_dim(counts: HeadCounts, q_rows: int) -> int | None:
    """Rows per head of a Q projection: an explicit ``head_dim`` that divides ``q_rows``, else
    ``q_rows // num_heads`` when that divides, else ``None``."""
    if counts.head_dim is not None and q_rows % counts.head_dim == 0:
        return counts.head_dim
    if counts.num_heads is not None and q_rows % counts.num_heads == 0:
        return q_rows // counts.num_heads
    return None


def fused_qkv_rows(counts: HeadCounts, rows: int) -> tuple[tuple[int, int, int], int] | None:
    """Split a contiguous fused projection of ``rows`` rows into Q, K, V rows and ``head_dim``, or ``None``.

    Q has ``num_heads`` heads, K and V ``num_kv_heads`` (``num_heads`` without GQA); ``head_dim`` is
    the explicit one, else ``rows / (num_heads + 2 * num_kv_heads)``. The three must sum to ``rows``.
    """
    if counts.num_heads is None:
        return None
    kv_heads = counts.num_kv_heads or counts.num_heads
    total_heads = counts.num_heads + 2 * kv_heads
    head_dim = counts.head_dim
    if head_dim is None or head_dim * total_heads != rows:
        if rows % total_heads:
            return None
        head_dim = rows // total_heads
    q, kv = counts.num_heads * head_dim, kv_heads * head_dim
    return ((q, kv, kv), head_dim) if q + 2 * kv == rows else None
