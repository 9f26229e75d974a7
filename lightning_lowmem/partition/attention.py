"""Read an attention module: which child projection feeds Q, K and V, and how its rows are laid out.

The attention module knows its head counts and the layout its ``forward`` reads: that is what
decides the blocks, not the width of a weight. Each reader below recognises one way attention
modules are written (from their attributes and the projections they own) and returns, for each
projection child, a :class:`~lightning_lowmem.partition.modules.Projection`: the Q/K/V parts of one
period of rows and how often the period repeats. Layouts read from transformers 5's modeling code:

==========================================  ==============================================================
module                                      rows of the fused projection
==========================================  ==============================================================
``c_attn``/``qkv``/``qkv_proj``/``Wqkv``    ``[Q | K | V]`` contiguous, K and V with the KV heads (GPT-2,
                                            Phi-3, MPT, nanoGPT)
GPT-NeoX, Bloom, Falcon-RW                  ``query_key_value`` as ``[heads, 3, head_dim]``
Falcon (``multi_query``)                    ``[Q (heads) | K (1 head) | V (1 head)]``
Falcon (``new_decoder_architecture``)       ``[kv_heads, heads / kv_heads + 2, head_dim]``
GPT-BigCode                                 ``[heads, 3, head_dim]``; multi-query ``[Q | K(1) | V(1)]``
CodeGen (``mp_num`` shards)                 ``[mp_num, (Q, V, K) of heads / mp_num heads each]``
cross-attention (``is_cross_attention``)    ``q_attn`` is Q; ``c_attn`` is ``[K | V]``
MLA (DeepSeek-V2/V3)                        ``q_b_proj`` per head of ``qk_nope + qk_rope`` rows;
                                            ``kv_b_proj`` ``[heads, (k_nope | v)]``;
                                            ``kv_a_proj_with_mqa`` ``[kv_lora_rank | shared rope key]``
==========================================  ==============================================================

Separate projections are found by the families of child names attention modules use (``q_proj``,
``query``, ``query_proj``, ``q_lin``, ``wq``, ``q``), Q and K both present.

Example::

    >>> projections = read_attention(model.gpt_neox.layers[0].attention)
    >>> projections["query_key_value"].repeat           # one period [Q, K, V] per head
    8
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from lightning_lowmem.partition.modules import (
    HeadCounts,
    Part,
    Projection,
    find_head_counts,
    fused_qkv_rows,
    is_linear_like,
    output_rows,
    positive_int,
    resolve_head_dim,
)

# Child-module names of separate Q/K/V projections, by naming family; Q and K must both be present.
QKV_FAMILIES = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("query_proj", "key_proj", "value_proj"),  # DeBERTa
    ("wq", "wk", "wv"),
    ("q", "k", "v"),  # T5
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
)
# Child-module names of a fused projection whose rows are Q, K, V in this order.
FUSED_QKV_NAMES = frozenset({"qkv", "c_attn", "Wqkv", "qkv_proj", "in_proj"})
# GPT-NeoX's, Bloom's and Falcon's fused projection (its layout depends on the module, see below).
INTERLEAVED_QKV_NAME = "query_key_value"

#: A projection child's layout, or why it could not be read (the parameter is then warned about).
Reading = dict[str, "Projection | str"]


def read_attention(module: nn.Module, ancestors: Sequence[nn.Module] = ()) -> Reading | None:
    """The layout of each Q/K/V projection child of ``module``, or ``None`` if it is no attention module.

    Args:
        module: a module that may own Q/K/V projections (``LlamaAttention``, ``GPTNeoXAttention``, ...).
        ancestors: its ancestors, nearest first (head counts may live on an ancestor's ``config``).

    Returns:
        ``{child name: Projection}`` for the children it feeds Q/K/V from; a string instead of a
        ``Projection`` says why that child's layout could not be read.
    """
    children = {name: child for name, child in module.named_children() if is_linear_like(child)}
    if not children:
        return None
    counts = find_head_counts(module, ancestors)
    for reader in _READERS:
        found = reader(module, children, counts)
        if found is not None:
            return found
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is ``nn.MultiheadAttention`` or owns Q/K/V projections."""
    return isinstance(module, nn.MultiheadAttention) or read_attention(module) is not None


def _query(rows: int, head_dim: int) -> Projection:
    return Projection((Part("query", rows, head_dim),))


def _per_head(counts: HeadCounts, rows: int) -> tuple[int, int] | str:
    """``(heads, head_dim)`` of a ``[heads, 3, head_dim]`` projection of ``rows`` rows, or why not."""
    heads = counts.num_heads
    if heads is None or rows % (3 * heads):
        return f"no head count ({counts}) splits its {rows} rows into [heads, 3, head_dim]"
    return heads, rows // (3 * heads)


def _interleaved(heads: int, head_dim: int) -> Projection:
    """``[heads, 3, head_dim]``: Q, K and V of each head in turn."""
    return Projection(
        (Part("query", head_dim, head_dim), Part("key", head_dim, head_dim), Part("value", head_dim)), repeat=heads
    )


def _mla(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """DeepSeek's multi-head latent attention (``kv_b_proj``, ``kv_a_proj_with_mqa``)."""
    dims = [positive_int(getattr(module, a, None)) for a in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")]
    lora = positive_int(getattr(module, "kv_lora_rank", None))
    if "kv_b_proj" not in children or None in dims or lora is None:
        return None
    nope, rope, v = dims
    if counts.num_heads is None:
        why = f"multi-head latent attention without a head count on {type(module).__name__} or its config"
        return dict.fromkeys(("q_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"), why)
    heads, qk = counts.num_heads, nope + rope
    return {
        "q_proj": _query(heads * qk, qk),
        "q_b_proj": _query(heads * qk, qk),
        "kv_a_proj_with_mqa": Projection((Part("linear", lora), Part("key", rope, rope))),
        "kv_b_proj": Projection((Part("key", nope, nope), Part("value", v)), repeat=heads),
    }


def _cross(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """Cross-attention with Q from ``q_attn`` and fused ``[K | V]`` in ``c_attn`` (GPT-2, GPT-BigCode)."""
    if getattr(module, "is_cross_attention", False) is not True or not {"q_attn", "c_attn"} <= set(children):
        return None
    q_rows, kv_rows = output_rows(children["q_attn"]), output_rows(children["c_attn"])
    head_dim = resolve_head_dim(counts, q_rows) if q_rows else None
    if head_dim is None or kv_rows % 2 or (kv_rows // 2) % head_dim:
        why = f"cross-attention whose head counts ({counts}) do not split {q_rows} Q rows and {kv_rows} K|V rows"
        return {"q_attn": why, "c_attn": why}
    half = kv_rows // 2
    return {"q_attn": _query(q_rows, head_dim), "c_attn": Projection((Part("key", half, head_dim), Part("value", half)))}


def _falcon(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """Falcon's ``query_key_value``: grouped (new decoder), multi-query, or per head."""
    if INTERLEAVED_QKV_NAME not in children or not hasattr(module, "multi_query"):
        return None
    rows = output_rows(children[INTERLEAVED_QKV_NAME])
    heads, kv_heads, head_dim = counts.num_heads, counts.num_kv_heads or 1, counts.head_dim
    if heads is None or head_dim is None:
        return {INTERLEAVED_QKV_NAME: f"Falcon attention without head counts ({counts})"}
    if getattr(module, "new_decoder_architecture", False):
        if heads % kv_heads:
            return {INTERLEAVED_QKV_NAME: f"{heads} query heads do not split into {kv_heads} KV groups"}
        q = Part("query", heads // kv_heads * head_dim, head_dim)
        layout = Projection((q, Part("key", head_dim, head_dim), Part("value", head_dim)), repeat=kv_heads)
    elif module.multi_query:
        layout = Projection((Part("query", heads * head_dim, head_dim), Part("key", head_dim, head_dim),
                             Part("value", head_dim)))
    else:
        layout = _interleaved(heads, head_dim)
    return {INTERLEAVED_QKV_NAME: layout if layout.rows == rows else f"Falcon layout of {layout.rows} rows, not {rows}"}


def _per_head_fused(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """GPT-NeoX's and Bloom's ``query_key_value``: ``[heads, 3, head_dim]``."""
    if INTERLEAVED_QKV_NAME not in children:
        return None
    split = _per_head(counts, output_rows(children[INTERLEAVED_QKV_NAME]))
    return {INTERLEAVED_QKV_NAME: split if isinstance(split, str) else _interleaved(*split)}


def _bigcode(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """GPT-BigCode's ``c_attn`` (it has a ``multi_query`` flag): multi-query contiguous, else per head."""
    if "c_attn" not in children or not hasattr(module, "multi_query"):
        return None
    rows = output_rows(children["c_attn"])
    if not module.multi_query:
        split = _per_head(counts, rows)
        return {"c_attn": split if isinstance(split, str) else _interleaved(*split)}
    head_dim = counts.head_dim
    if head_dim is None or rows <= 2 * head_dim:
        return {"c_attn": f"multi-query c_attn of {rows} rows without a head_dim ({counts})"}
    q = rows - 2 * head_dim
    return {"c_attn": Projection((Part("query", q, head_dim), Part("key", head_dim, head_dim), Part("value", head_dim)))}


def _codegen(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """CodeGen's ``qkv_proj``: ``mp_num`` shards, each ``[Q, V, K]`` of ``heads / mp_num`` heads."""
    shards = positive_int(getattr(module, "mp_num", None))
    if shards is None or "qkv_proj" not in children:
        return None
    rows, heads = output_rows(children["qkv_proj"]), counts.num_heads
    if heads is None or heads % shards or rows % (3 * heads):
        return {"qkv_proj": f"head counts ({counts}) do not split {rows} rows into {shards} shards of [Q, V, K]"}
    head_dim = rows // (3 * heads)
    local = heads // shards * head_dim
    parts = (Part("query", local, head_dim), Part("value", local), Part("key", local, head_dim))
    return {"qkv_proj": Projection(parts, repeat=shards)}


def _contiguous_fused(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """``[Q | K | V]`` in one projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, ``Wqkv``, ``qkv``)."""
    name = next((n for n in children if n in FUSED_QKV_NAMES), None)
    if name is None:
        return None
    rows = output_rows(children[name])
    split = fused_qkv_rows(counts, rows)
    if split is None:
        return {name: f"the head counts ({counts}) do not split its {rows} rows into Q, K and V"}
    (q, k, v), head_dim = split
    return {name: Projection((Part("query", q, head_dim), Part("key", k, head_dim), Part("value", v)))}


def _separate(module: nn.Module, children: dict[str, nn.Module], counts: HeadCounts) -> Reading | None:
    """Separate Q, K and V projections; Q and K by head when a head size divides both."""
    family = next((f for f in QKV_FAMILIES if f[0] in children and f[1] in children), None)
    if family is None:
        return None
    q_rows, k_rows = output_rows(children[family[0]]), output_rows(children[family[1]])
    head_dim = resolve_head_dim(counts, q_rows) if q_rows else None
    out: Reading = {}
    if family[2] in children:
        out[family[2]] = Projection((Part("value", output_rows(children[family[2]])),))
    if head_dim is None or k_rows % head_dim:
        why = (
            f"no head count on {type(module).__name__} or its config ({counts}) splits {q_rows} query rows "
            f"and {k_rows} key rows into heads"
        )
        return {family[0]: why, family[1]: why, **out}
    return {family[0]: _query(q_rows, head_dim), family[1]: Projection((Part("key", k_rows, head_dim),)), **out}


_READERS: tuple[Callable[[nn.Module, dict[str, nn.Module], HeadCounts], Reading | None], ...] = (
    _mla,
    _cross,
    _falcon,
    _per_head_fused,
    _codegen,
    _bigcode,
    _contiguous_fused,
    _separate,
)
