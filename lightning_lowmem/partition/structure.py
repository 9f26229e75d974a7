"""What each trainable parameter of a model is, read from the model's structure.

The module that owns a parameter, that module's class and its siblings decide the parameter's
*role* (see :data:`ROLES`); attention modules and their configs give head counts. Parameter names
are only used where the structure itself is named (``q_proj`` next to ``k_proj``, a fused
``c_attn`` child): a name substring alone is what made the reference implementation of Adam-mini
misclassify layers (e.g. every weight whose name contains ``"attn"``).

Only global shapes (``tuple(p.shape)``) are read, never values, so this works on the meta device
and on FSDP2 ``DTensor`` parameters. ``fully_shard`` swaps a module's class for an ``FSDP<Name>``
subclass, so class names are matched along the MRO.

Example::

    >>> infos = describe_parameters(model)
    >>> {info.name: info.role for info in infos}["transformer.h.0.attn.c_attn.weight"]
    'qkv'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

#: Every role :func:`describe_parameters` can give a parameter.
ROLES = (
    "query",
    "key",
    "value",
    "qkv",
    "attn_out",
    "mlp",
    "linear",
    "embedding",
    "output",
    "tied_embedding",
    "norm",
    "bias",
    "conv",
    "other",
)

#: Roles that get no weight decay in the default parameter groups.
NO_DECAY_ROLES = ("bias", "norm", "embedding", "tied_embedding")

# Attribute names that carry head counts, looked up on the attention module, then on a `config`.
HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")
NUM_HEADS_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead")
NUM_KV_HEADS_ATTRS = ("num_key_value_heads", "n_kv_head", "n_kv_heads", "num_kv_heads")

# Child-module names of separate Q/K/V projections, by naming family; Q and K must both be present.
QKV_FAMILIES = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("wq", "wk", "wv"),
    ("q", "k", "v"),  # T5
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
)
# Child-module names of a fused projection whose rows are Q, K, V in this order. (GPT-NeoX's
# `query_key_value` interleaves heads, so it is deliberately not here.)
FUSED_QKV_NAMES = frozenset({"qkv", "c_attn", "Wqkv", "qkv_proj", "in_proj"})
# Child-module names of an attention output projection (next to Q/K/V or a fused projection).
ATTN_OUT_NAMES = frozenset({"o_proj", "out_proj", "dense", "wo", "o", "out_lin", "c_proj"})
# A module containing children with these names is an MLP.
MLP_CHILD_NAMES = frozenset({"c_fc", "c_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
MLP_CLASS_PATTERN = re.compile(r"mlp|feedforward|ffn", re.IGNORECASE)
NORM_CLASS_PATTERN = re.compile(r"Norm(\dd)?$")
ATTENTION_CLASS_PATTERN = re.compile(r"attention", re.IGNORECASE)

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
class ParamInfo:
    """What one trainable parameter is.

    Args:
        name: the first fully-qualified name ``named_parameters()`` gives.
        shape: the global shape.
        role: one of :data:`ROLES`.
        aliases: the other names of the same tensor (tied weights).
        transposed: the output rows are dim 1 (GPT-2's ``Conv1D``).
        head_dim: rows per attention head, for ``query``, ``key`` and ``qkv``.
        qkv_rows: rows of the Q, K and V segments, for ``qkv``.
        fallback: why the structure could not place the parameter (it gets the preset's fallback
            spec and is listed in a warning); ``None`` when it was understood.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    aliases: tuple[str, ...] = ()
    transposed: bool = False
    head_dim: int | None = None
    qkv_rows: tuple[int, int, int] | None = None
    fallback: str | None = None


@dataclasses.dataclass(frozen=True)
class _Usage:
    """One place a parameter is registered: the owning module, its path and the attribute name."""

    module_path: str
    module: nn.Module
    attr: str


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


def _positive_int(value: Any) -> int | None:
    """``value`` if it is a positive int (not a bool), else ``None``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _lookup(objects: Sequence[Any], attrs: Iterable[str]) -> int | None:
    """The first positive-int attribute among ``attrs``, trying each object in order."""
    for obj in objects:
        for attr in attrs:
            found = _positive_int(getattr(obj, attr, None))
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
        num_heads=_lookup(sources, NUM_HEADS_ATTRS),
        num_kv_heads=_lookup(sources, NUM_KV_HEADS_ATTRS),
        head_dim=_lookup(sources, HEAD_DIM_ATTRS),
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
    """Split a fused projection of ``rows`` rows into Q, K, V rows and ``head_dim``, or ``None``.

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


def _qkv_family(parent: nn.Module) -> tuple[str, str, str] | None:
    """The Q/K/V naming family whose Q and K children are Linear-like children of ``parent``."""
    children = dict(parent.named_children())
    for family in QKV_FAMILIES:
        if all(name in children and is_linear_like(children[name]) for name in family[:2]):
            return family
    return None


def _is_attention(module: nn.Module) -> bool:
    """Has separate Q/K projections, a fused projection child, or is ``nn.MultiheadAttention``."""
    if isinstance(module, nn.MultiheadAttention) or _qkv_family(module) is not None:
        return True
    return any(name in FUSED_QKV_NAMES and is_linear_like(child) for name, child in module.named_children())


def _looks_like_mlp(module: nn.Module) -> bool:
    """Class name mentions MLP/FeedForward/FFN, or it has children named like MLP projections."""
    if any(MLP_CLASS_PATTERN.search(n) for n in class_names(module)):
        return True
    return any(name in MLP_CHILD_NAMES for name, _ in module.named_children())


class _ModelIndex:
    """Module lookups by path for one model: parents, ancestors, output heads."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
        self.output_heads = self._find_output_heads()

    def parent_path(self, path: str) -> str | None:
        """Path of the parent module; ``None`` for the root."""
        if not path:
            return None
        return path.rpartition(".")[0]

    def ancestors(self, path: str) -> list[nn.Module]:
        """Ancestors of the module at ``path``, nearest first, the root last."""
        out = []
        parent = self.parent_path(path)
        while parent is not None:
            out.append(self.modules[parent])
            parent = self.parent_path(parent)
        return out

    def _find_output_heads(self) -> set[int]:
        """``id``s of output-head modules: ``get_output_embeddings()`` of any module that has it, else
        every Linear shaped ``[num_embeddings, embedding_dim]`` of some ``nn.Embedding``."""
        heads: set[int] = set()
        for module in self.modules.values():
            getter = getattr(module, "get_output_embeddings", None)
            if not callable(getter):
                continue
            try:
                head = getter()
            except Exception:  # noqa: BLE001 - a model's own helper may refuse; then use shapes
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
        if heads:
            return heads
        embedding_shapes = {
            (int(m.num_embeddings), int(m.embedding_dim))
            for m in self.modules.values()
            if isinstance(m, EMBEDDING_TYPES)
        }
        for module in self.modules.values():
            if isinstance(module, nn.Linear) and (module.out_features, module.in_features) in embedding_shapes:
                heads.add(id(module))
        return heads


def describe_parameters(model: nn.Module) -> list[ParamInfo]:
    """Describe every trainable parameter of ``model``, in ``named_parameters()`` order.

    Frozen parameters (``requires_grad=False``) are left out. A tensor registered under several
    names (tied weights) is described once under its first name, the others are its ``aliases``.

    Args:
        model: any ``nn.Module``, on any device (``meta`` included), sharded with FSDP2 or not.

    Returns:
        One :class:`ParamInfo` per trainable tensor.
    """
    index = _ModelIndex(model)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    usages: dict[int, list[_Usage]] = {}
    for path, module in index.modules.items():
        for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
            usages.setdefault(id(param), []).append(_Usage(path, module, attr))

    infos = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        all_names = names[id(param)]
        aliases = tuple(n for n in all_names if n != name)
        info = _describe(name, tuple(int(s) for s in param.shape), usages[id(param)], index)
        infos.append(dataclasses.replace(info, aliases=aliases))
    return infos


def _describe(name: str, shape: tuple[int, ...], usages: list[_Usage], index: _ModelIndex) -> ParamInfo:
    """Role (and head layout) of one parameter from the modules that register it."""
    is_embedding = any(isinstance(u.module, EMBEDDING_TYPES) and u.attr == "weight" for u in usages)
    is_head = any(
        u.attr == "weight" and (is_linear_like(u.module) or id(u.module) in index.output_heads) for u in usages
    )
    if is_embedding and is_head:
        return ParamInfo(name, shape, "tied_embedding")
    return _describe_usage(name, shape, usages[0], index)


def _describe_usage(name: str, shape: tuple[int, ...], usage: _Usage, index: _ModelIndex) -> ParamInfo:
    """Role of a parameter registered as ``usage.attr`` on ``usage.module``."""
    module, attr = usage.module, usage.attr
    if isinstance(module, nn.MultiheadAttention):
        return _describe_mha(name, shape, module, attr)
    if attr == "bias" or attr.endswith("_bias"):
        return ParamInfo(name, shape, "bias")
    if is_norm(module):
        return ParamInfo(name, shape, "norm")
    if attr != "weight":
        return _unknown(name, shape, module, attr)
    if isinstance(module, EMBEDDING_TYPES):
        return ParamInfo(name, shape, "embedding")
    if isinstance(module, CONV_TYPES):
        return ParamInfo(name, shape, "conv")
    if is_linear_like(module):
        return _describe_linear(name, shape, usage, index)
    return _unknown(name, shape, module, attr)


def _unknown(name: str, shape: tuple[int, ...], module: nn.Module, attr: str) -> ParamInfo:
    """A parameter no structural rule covers: role ``other``, with the reason for the warning."""
    why = f"parameter {attr!r} registered directly on a {type(module).__name__}, which no structural rule covers"
    return ParamInfo(name, shape, "other", fallback=why)


def _describe_mha(name: str, shape: tuple[int, ...], mha: nn.MultiheadAttention, attr: str) -> ParamInfo:
    """Parameters registered directly on ``nn.MultiheadAttention`` (``out_proj`` is a child Linear)."""
    head_dim = mha.embed_dim // mha.num_heads
    if attr == "in_proj_weight":
        e = mha.embed_dim
        return ParamInfo(name, shape, "qkv", head_dim=head_dim, qkv_rows=(e, e, e))
    if attr in ("q_proj_weight", "k_proj_weight"):
        return ParamInfo(name, shape, "query" if attr[0] == "q" else "key", head_dim=head_dim)
    if attr == "v_proj_weight":
        return ParamInfo(name, shape, "value")
    if attr in ("in_proj_bias", "bias_k", "bias_v"):
        return ParamInfo(name, shape, "bias")
    return _unknown(name, shape, mha, attr)


def _describe_linear(name: str, shape: tuple[int, ...], usage: _Usage, index: _ModelIndex) -> ParamInfo:
    """Role of a Linear-like weight from its own name among its siblings and its parent's class."""
    module = usage.module
    transposed = is_conv1d_transposed(module)
    if id(module) in index.output_heads:
        return ParamInfo(name, shape, "output", transposed=transposed)
    parent_path = index.parent_path(usage.module_path)
    if parent_path is None:
        return ParamInfo(name, shape, "linear", transposed=transposed)
    parent = index.modules[parent_path]
    child = usage.module_path.rpartition(".")[2]
    ancestors = index.ancestors(parent_path)

    if isinstance(parent, nn.MultiheadAttention):
        return ParamInfo(name, shape, "attn_out", transposed=transposed)
    family = _qkv_family(parent)
    if family is not None and child in family:
        role = ("query", "key", "value")[family.index(child)]
        return _separate_projection(name, shape, role, family, parent, ancestors, transposed)
    if child in FUSED_QKV_NAMES:
        return _fused_projection(name, shape, parent, ancestors, transposed)
    if child in ATTN_OUT_NAMES and (
        _is_attention(parent) or (not _looks_like_mlp(parent) and _beside_attention(parent_path, index))
    ):
        return ParamInfo(name, shape, "attn_out", transposed=transposed)
    role = "mlp" if _looks_like_mlp(parent) and not _is_attention(parent) else "linear"
    return ParamInfo(name, shape, role, transposed=transposed)


def _beside_attention(parent_path: str, index: _ModelIndex) -> bool:
    """BERT's layout: ``attention.output.dense`` sits beside ``attention.self`` (which has Q/K/V), both
    inside an ``...Attention`` class (``BertAttention``, ``ViTAttention``)."""
    grand_path = index.parent_path(parent_path)
    if grand_path is None:
        return False
    parent, grand = index.modules[parent_path], index.modules[grand_path]
    if not any(ATTENTION_CLASS_PATTERN.search(n) for n in class_names(grand)):
        return False
    return any(sibling is not parent and _is_attention(sibling) for _, sibling in grand.named_children())


def _separate_projection(
    name: str,
    shape: tuple[int, ...],
    role: str,
    family: tuple[str, str, str],
    parent: nn.Module,
    ancestors: Sequence[nn.Module],
    transposed: bool,
) -> ParamInfo:
    """A Q, K or V projection; Q and K need a head size that divides their rows."""
    if role == "value":
        return ParamInfo(name, shape, "value", transposed=transposed)
    counts = find_head_counts(parent, ancestors)
    q_rows = output_rows(getattr(parent, family[0]))
    head_dim = resolve_head_dim(counts, q_rows) if q_rows else None
    rows = shape[1] if transposed else shape[0]
    if head_dim is None or rows % head_dim:
        why = (
            f"{role} projection, but no head count on {type(parent).__name__} or its config "
            f"({counts}) splits {q_rows} query rows and {rows} {role} rows into heads"
        )
        return ParamInfo(name, shape, "linear", transposed=transposed, fallback=why)
    return ParamInfo(name, shape, role, transposed=transposed, head_dim=head_dim)


def _fused_projection(
    name: str, shape: tuple[int, ...], parent: nn.Module, ancestors: Sequence[nn.Module], transposed: bool
) -> ParamInfo:
    """A fused Q/K/V projection; falls back to ``linear`` when the head counts do not fit its rows."""
    counts = find_head_counts(parent, ancestors)
    rows = shape[1] if transposed else shape[0]
    split = fused_qkv_rows(counts, rows)
    if split is None:
        why = (
            f"fused QKV projection, but the head counts on {type(parent).__name__} or its config "
            f"({counts}) do not split its {rows} rows into Q, K and V"
        )
        return ParamInfo(name, shape, "linear", transposed=transposed, fallback=why)
    qkv_rows, head_dim = split
    return ParamInfo(name, shape, "qkv", transposed=transposed, head_dim=head_dim, qkv_rows=qkv_rows)
