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

from torch import nn

from lightning_lowmem.partition.attention import FUSED_QKV_NAMES, QKV_FAMILIES, is_attention, read_attention
from lightning_lowmem.partition.modules import (
    CONV_TYPES,
    EMBEDDING_TYPES,
    HeadCounts,
    Part,
    Projection,
    class_names,
    find_head_counts,
    fused_qkv_rows,
    is_conv1d_transposed,
    is_linear_like,
    is_norm,
    output_rows,
    resolve_head_dim,
)
from lightning_lowmem.partition.moe import describe_expert_parameter

__all__ = [
    "FUSED_QKV_NAMES",
    "NO_DECAY_ROLES",
    "QKV_FAMILIES",
    "ROLES",
    "HeadCounts",
    "ParamInfo",
    "Part",
    "describe_parameters",
    "find_head_counts",
    "fused_qkv_rows",
    "is_conv1d_transposed",
    "is_linear_like",
    "output_rows",
    "resolve_head_dim",
]

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

# Child-module names of an attention output projection (next to Q/K/V or a fused projection).
ATTN_OUT_NAMES = frozenset({"o_proj", "out_proj", "dense", "wo", "o", "out_lin", "c_proj"})
# A module containing children with these names is an MLP.
MLP_CHILD_NAMES = frozenset({"c_fc", "c_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
MLP_CLASS_PATTERN = re.compile(r"mlp|feedforward|ffn", re.IGNORECASE)
ATTENTION_CLASS_PATTERN = re.compile(r"attention", re.IGNORECASE)
# A module class that holds learned tables added to the input (ViT's ``position_embeddings``).
EMBEDDINGS_CLASS_PATTERN = re.compile(r"Embedding", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What one trainable parameter is.

    Args:
        name: the first fully-qualified name ``named_parameters()`` gives.
        shape: the global shape.
        role: one of :data:`ROLES` (``"qkv"`` for a projection of several parts).
        aliases: the other names of the same tensor (tied weights).
        transposed: the output rows are the last dim (GPT-2's ``Conv1D``, GPT-OSS's expert banks).
        head_dim: rows per attention head, for ``query`` and ``key``.
        parts: for a fused projection, the parts of one period of its rows (Q, K, V, a latent).
        repeat: periods of ``parts`` over the rows (heads of GPT-NeoX's ``[heads, 3, head_dim]``).
        bank_dims: leading dims whose slices never share a block (experts; the 1 of ``[1, N, D]``).
        fallback: why the structure could not place the parameter with certainty (it is listed in
            a warning with the blocks it got); ``None`` when it was understood.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    aliases: tuple[str, ...] = ()
    transposed: bool = False
    head_dim: int | None = None
    parts: tuple[Part, ...] = ()
    repeat: int = 1
    bank_dims: int = 0
    fallback: str | None = None

    @property
    def qkv_rows(self) -> tuple[int, int, int] | None:
        """Rows of Q, K and V of a fused projection, over all its periods; ``None`` otherwise."""
        if not self.parts:
            return None
        rows = {role: self.repeat * sum(p.rows for p in self.parts if p.role == role) for role in ("query", "key", "value")}
        return rows["query"], rows["key"], rows["value"]


@dataclasses.dataclass(frozen=True)
class _Usage:
    """One place a parameter is registered: the owning module, its path and the attribute name."""

    module_path: str
    module: nn.Module
    attr: str


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
        self.output_heads = _find_output_heads(model, self.modules)

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


def _find_output_heads(model: nn.Module, modules: dict[str, nn.Module]) -> set[int]:
    """``id``s of the modules the model returns logits from.

    A Hugging Face model says it: ``get_output_embeddings()`` (the LM head), else its task head is
    the last Linear-like child of the root (``classifier``, ``score``, ``qa_outputs``) beside its
    ``base_model`` (a base model itself, ``BertModel``, returns no logits: its pooler is no head). Any other
    model: the last Linear-like child of the root whose outputs are an embedding's vocabulary
    (nanoGPT's untied ``lm_head``). A weight tied to an input embedding is a head wherever it is.
    A shape alone decides nothing: a ``Linear(H, 2)`` classifier is shaped like a token-type table,
    and BERT-medium's query weight like its position table.
    """
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (AttributeError, NotImplementedError):  # a model's own helper may refuse
            head = None
        if isinstance(head, nn.Module):
            return {id(head)}
        if getattr(model, "base_model", model) is model:  # a base model (``BertModel``) returns no logits
            return set()
        last = [child for child in model.children() if is_linear_like(child)]
        return {id(last[-1])} if last else set()
    vocabularies = {int(m.num_embeddings) for m in modules.values() if isinstance(m, EMBEDDING_TYPES)}
    heads = [child for child in model.children() if isinstance(child, nn.Linear) and child.out_features in vocabularies]
    return {id(heads[-1])} if heads else set()


def describe_parameters(model: nn.Module, *, include_frozen: bool = False) -> list[ParamInfo]:
    """Describe every trainable parameter of ``model``, in ``named_parameters()`` order.

    Frozen parameters (``requires_grad=False``) are left out unless ``include_frozen``. A tensor registered under several
    names (tied weights) is described once under its first name, the others are its ``aliases``.

    Args:
        model: any ``nn.Module``, on any device (``meta`` included), sharded with FSDP2 or not.
        include_frozen: describe parameters with ``requires_grad=False`` too.

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
        if not (param.requires_grad or include_frozen):
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
    expert = describe_expert_parameter(shape, module, attr)
    if expert is not None:
        return ParamInfo(
            name, shape, expert.role, transposed=expert.transposed, bank_dims=expert.bank_dims, fallback=expert.doubt
        )
    if attr == "bias" or attr.endswith("_bias") or _per_head_scalars(shape, module, index, usage):
        return ParamInfo(name, shape, "bias")
    if is_norm(module):
        return ParamInfo(name, shape, "norm")
    if attr != "weight":
        return _direct(name, shape, module, attr)
    if isinstance(module, EMBEDDING_TYPES):
        return ParamInfo(name, shape, "embedding")
    if isinstance(module, CONV_TYPES):
        return ParamInfo(name, shape, "conv")
    if is_linear_like(module):
        return _describe_linear(name, shape, usage, index)
    return _direct(name, shape, module, attr)


def _per_head_scalars(shape: tuple[int, ...], module: nn.Module, index: _ModelIndex, usage: _Usage) -> bool:
    """One value per head registered on an attention module (GPT-OSS's attention ``sinks``): added to
    the attention logits like a bias, elementwise."""
    if len(shape) != 1 or read_attention(module) is None:
        return False
    return find_head_counts(module, index.ancestors(usage.module_path)).num_heads == shape[0]


def _direct(name: str, shape: tuple[int, ...], module: nn.Module, attr: str) -> ParamInfo:
    """A parameter registered directly on a module that is no Linear, norm or embedding layer.

    On an ``...Embeddings`` module it is a learned table added to the inputs: ``[1, N, D]``
    position tables (ViT) get one row per position (leading 1-dims are banks, the last dim is
    reduced), a ``[1, 1, D]`` class token one row. Anything else is
    ``other``, with the reason for the warning.
    """
    if shape and any(EMBEDDINGS_CLASS_PATTERN.search(n) for n in class_names(module)):
        singleton = next((i for i, size in enumerate(shape) if size != 1), len(shape) - 1)
        return ParamInfo(name, shape, "embedding", bank_dims=min(singleton, max(len(shape) - 2, 0)))
    why = f"parameter {attr!r} registered directly on a {type(module).__name__}, which no structural rule covers"
    return ParamInfo(name, shape, "other", fallback=why)


def _describe_mha(name: str, shape: tuple[int, ...], mha: nn.MultiheadAttention, attr: str) -> ParamInfo:
    """Parameters registered directly on ``nn.MultiheadAttention`` (``out_proj`` is a child Linear).

    ``in_proj_weight`` is ``[Q | K | V]`` of ``embed_dim`` rows each; with ``kdim``/``vdim`` the three
    are separate ``q_proj_weight``, ``k_proj_weight`` (``[embed_dim, kdim]``), ``v_proj_weight``.
    """
    head_dim = mha.embed_dim // mha.num_heads
    if attr == "in_proj_weight":
        e = mha.embed_dim
        parts = (Part("query", e, head_dim), Part("key", e, head_dim), Part("value", e))
        return ParamInfo(name, shape, "qkv", head_dim=head_dim, parts=parts)
    if attr in ("q_proj_weight", "k_proj_weight"):
        return ParamInfo(name, shape, "query" if attr[0] == "q" else "key", head_dim=head_dim)
    if attr == "v_proj_weight":
        return ParamInfo(name, shape, "value")
    if attr in ("in_proj_bias", "bias_k", "bias_v"):
        return ParamInfo(name, shape, "bias")
    return _direct(name, shape, mha, attr)


def _describe_linear(name: str, shape: tuple[int, ...], usage: _Usage, index: _ModelIndex) -> ParamInfo:
    """Role of a Linear-like weight: an output head, a Q/K/V projection its attention module reads,
    an attention output, an MLP or another linear layer."""
    module = usage.module
    transposed = is_conv1d_transposed(module)
    if id(module) in index.output_heads:
        return ParamInfo(name, shape, "output", transposed=transposed)
    parent_path = index.parent_path(usage.module_path)
    if parent_path is None:
        return ParamInfo(name, shape, "linear", transposed=transposed)
    parent = index.modules[parent_path]
    child = usage.module_path.rpartition(".")[2]

    if isinstance(parent, nn.MultiheadAttention):
        return ParamInfo(name, shape, "attn_out", transposed=transposed)
    reading = read_attention(parent, index.ancestors(parent_path))
    if reading is not None and child in reading:
        return _projection(name, shape, transposed, reading[child], parent)
    if child in ATTN_OUT_NAMES and (
        reading is not None or (not _looks_like_mlp(parent) and _beside_attention(parent_path, index))
    ):
        return ParamInfo(name, shape, "attn_out", transposed=transposed)
    role = "mlp" if _looks_like_mlp(parent) and reading is None else "linear"
    return ParamInfo(name, shape, role, transposed=transposed)


def _projection(
    name: str, shape: tuple[int, ...], transposed: bool, layout: Projection | str, parent: nn.Module
) -> ParamInfo:
    """A Q/K/V projection as its attention module reads it; ``linear`` (warned about) when unread."""
    rows = shape[1] if transposed else shape[0]
    if isinstance(layout, str) or layout.rows != rows:
        why = layout if isinstance(layout, str) else f"its layout has {layout.rows} rows, the weight {rows}"
        return ParamInfo(name, shape, "linear", transposed=transposed, fallback=f"{type(parent).__name__}: {why}")
    if len(layout.parts) == 1 and layout.repeat == 1:
        part = layout.parts[0]
        return ParamInfo(name, shape, part.role, transposed=transposed, head_dim=part.head_dim)
    head_dim = next((p.head_dim for p in layout.parts if p.head_dim is not None), None)
    return ParamInfo(
        name, shape, "qkv", transposed=transposed, head_dim=head_dim, parts=layout.parts, repeat=layout.repeat
    )


def _beside_attention(parent_path: str, index: _ModelIndex) -> bool:
    """BERT's layout: ``attention.output.dense`` sits beside ``attention.self`` (which has Q/K/V), both
    inside an ``...Attention`` class (``BertAttention``, ``ViTAttention``)."""
    grand_path = index.parent_path(parent_path)
    if grand_path is None:
        return False
    parent, grand = index.modules[parent_path], index.modules[grand_path]
    if not any(ATTENTION_CLASS_PATTERN.search(n) for n in class_names(grand)):
        return False
    return any(sibling is not parent and is_attention(sibling) for _, sibling in grand.named_children())
