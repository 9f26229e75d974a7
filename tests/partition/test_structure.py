"""Roles and head layouts read from a model's structure (never from values, never names alone)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_lowmem.partition.structure import (
    HeadCounts,
    ParamInfo,
    describe_parameters,
    find_head_counts,
    fused_qkv_rows,
    resolve_head_dim,
)


def _infos(model: nn.Module) -> dict[str, ParamInfo]:
    return {info.name: info for info in describe_parameters(model)}


def _roles(model: nn.Module) -> dict[str, str]:
    return {name: info.role for name, info in _infos(model).items()}


# ------------------------------------------------------------------------------------------------
# Small models


class LlamaLikeAttention(nn.Module):
    """Separate q/k/v/o projections, GQA, head_dim (16) != hidden / num_heads (12)."""

    def __init__(self, hidden: int = 48, num_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 16) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_key_value_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int = 48, inner: int = 96) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)


class MyRMSNorm(nn.Module):
    """A norm known only by its class name (like HF's LlamaRMSNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class CausalSelfAttention(nn.Module):
    """nanoGPT: fused c_attn [3E, E] and an `n_head` attribute."""

    def __init__(self, n_embd: int = 32, n_head: int = 4) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)


class MLP(nn.Module):
    def __init__(self, n_embd: int = 32) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)


class Block(nn.Module):
    def __init__(self, n_embd: int = 32, n_head: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)


class TinyGPT(nn.Module):
    """nanoGPT with a tied output head: `lm_head.weight = wte.weight`."""

    def __init__(self, vocab: int = 50, n_embd: int = 32, n_head: int = 4, block_size: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(2)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


# ------------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def test_multihead_attention_fused_in_proj() -> None:
    """in_proj_weight [3E, E] splits into Q, K, V of E rows each, head_dim = E / num_heads."""
    infos = _infos(nn.MultiheadAttention(32, 4))
    fused = infos["in_proj_weight"]
    assert (fused.role, fused.qkv_rows, fused.head_dim) == ("qkv", (32, 32, 32), 8)
    assert infos["in_proj_bias"].role == "bias"
    assert infos["out_proj.weight"].role == "attn_out"
    assert infos["out_proj.bias"].role == "bias"


def test_multihead_attention_separate_projections() -> None:
    """kdim/vdim != embed_dim gives q/k/v_proj_weight; bias_k/bias_v are biases."""
    infos = _infos(nn.MultiheadAttention(32, 4, kdim=12, vdim=20, add_bias_kv=True))
    assert {n: (i.role, i.head_dim) for n, i in infos.items() if "proj_weight" in n} == {
        "q_proj_weight": ("query", 8),
        "k_proj_weight": ("key", 8),
        "v_proj_weight": ("value", None),
    }
    assert infos["bias_k"].role == infos["bias_v"].role == "bias"


# ------------------------------------------------------------------------------------------------
# Separate projections


def test_llama_like_gqa_heads() -> None:
    """head_dim comes from the attribute (16), not hidden / num_heads (12); K has 2 heads."""
    infos = _infos(LlamaLikeAttention())
    assert (infos["q_proj.weight"].role, infos["q_proj.weight"].head_dim) == ("query", 16)
    assert (infos["k_proj.weight"].role, infos["k_proj.weight"].head_dim) == ("key", 16)
    assert infos["k_proj.weight"].shape == (32, 48)
    assert infos["v_proj.weight"].role == "value"
    assert infos["o_proj.weight"].role == "attn_out"


def test_head_counts_from_an_ancestor_config() -> None:
    """No attributes on the attention module: heads come from the nearest `config` above it."""

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(48, n, bias=False) for n in (60, 30, 30, 48))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(n_heads=4, n_kv_heads=2)
            self.layer = nn.Sequential(Bare())

    infos = _infos(Model())
    assert (infos["layer.0.wq.weight"].role, infos["layer.0.wq.weight"].head_dim) == ("query", 15)
    assert (infos["layer.0.wk.weight"].role, infos["layer.0.wk.weight"].head_dim) == ("key", 15)
    assert infos["layer.0.wo.weight"].role == "attn_out"


def test_bert_style_output_dense_beside_attention() -> None:
    """`attention.output.dense` is the attention output; the FFN's `output.dense` is not."""

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_attention_heads, self.attention_head_size = 2, 8
            self.query, self.key, self.value = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    class Dense(nn.Module):
        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.dense = nn.Linear(i, o)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self, self.output = SelfAttention(), Dense(16, 16)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention, self.intermediate, self.output = Attention(), Dense(16, 32), Dense(32, 16)

    class Block(nn.Module):
        """Not BERT: a `dense` beside an attention, but in a block, not an `...Attention` class."""

        def __init__(self) -> None:
            super().__init__()
            self.attn, self.ffn = SelfAttention(), Dense(16, 16)

    assert _roles(Block())["ffn.dense.weight"] == "linear"
    roles = _roles(Layer())
    assert roles["attention.self.query.weight"] == "query"
    assert roles["attention.self.key.weight"] == "key"
    assert roles["attention.output.dense.weight"] == "attn_out"
    assert roles["intermediate.dense.weight"] == "linear"
    assert roles["output.dense.weight"] == "linear"


def test_query_without_head_counts_falls_back_to_linear() -> None:
    """q_proj/k_proj with nothing that tells the heads: linear, with a reason for the warning."""

    class NoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    info = _infos(NoHeads())["q_proj.weight"]
    assert info.role == "linear"
    assert "no head count on NoHeads" in info.fallback


# ------------------------------------------------------------------------------------------------
# Fused projections


def test_nanogpt_fused_c_attn_and_roles() -> None:
    infos = _infos(TinyGPT())
    c_attn = infos["h.0.attn.c_attn.weight"]
    assert (c_attn.role, c_attn.qkv_rows, c_attn.head_dim, c_attn.transposed) == ("qkv", (32, 32, 32), 8, False)
    roles = {name: info.role for name, info in infos.items()}
    assert roles["h.0.attn.c_proj.weight"] == "attn_out"
    assert roles["h.0.mlp.c_fc.weight"] == roles["h.0.mlp.c_proj.weight"] == "mlp"
    assert roles["h.0.ln_1.weight"] == "norm"
    assert roles["h.0.ln_1.bias"] == roles["h.0.attn.c_attn.bias"] == "bias"
    assert roles["wpe.weight"] == "embedding"


def test_fused_projection_with_gqa_rows() -> None:
    """qkv rows = (num_heads + 2 * kv_heads) * head_dim: Q 4 heads, K and V 2 heads of 16 rows."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.num_kv_heads, self.head_dim = 4, 2, 16
            self.qkv_proj = nn.Linear(48, (4 + 2 + 2) * 16)

    info = _infos(Attn())["qkv_proj.weight"]
    assert (info.role, info.qkv_rows, info.head_dim) == ("qkv", (64, 32, 32), 16)


def test_fused_projection_that_does_not_fit_falls_back() -> None:
    """3 heads cannot split 100 rows into Q, K, V: linear, with the reason."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_head = 3
            self.qkv = nn.Linear(8, 100)

    info = _infos(Attn())["qkv.weight"]
    assert (info.role, info.qkv_rows) == ("linear", None)
    assert "do not split its 100 rows" in info.fallback


def test_transformers_conv1d_is_transposed() -> None:
    """Every Conv1D weight is [in, out]; the fused one splits its 3 * 16 output columns."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 2
            self.c_attn = conv1d(48, 16)  # nf=48 outputs, nx=16 inputs: weight [16, 48]
            self.c_proj = conv1d(16, 16)

    infos = _infos(Attn())
    c_attn = infos["c_attn.weight"]
    assert c_attn.shape == (16, 48)
    assert (c_attn.role, c_attn.transposed, c_attn.qkv_rows, c_attn.head_dim) == ("qkv", True, (16, 16, 16), 8)
    assert (infos["c_proj.weight"].role, infos["c_proj.weight"].transposed) == ("attn_out", True)


# ------------------------------------------------------------------------------------------------
# Embeddings, output heads, norms, the rest


def test_tied_output_head_is_one_entry_with_alias() -> None:
    infos = _infos(TinyGPT())
    assert "lm_head.weight" not in infos
    assert (infos["wte.weight"].role, infos["wte.weight"].aliases) == ("tied_embedding", ("lm_head.weight",))


def test_untied_output_head_by_shape() -> None:
    """A Linear shaped [num_embeddings, embedding_dim] of an Embedding is the output head."""
    model = nn.ModuleDict({"emb": nn.Embedding(50, 8), "proj": nn.Linear(8, 8), "head": nn.Linear(8, 50)})
    assert _roles(model) == {
        "emb.weight": "embedding",
        "proj.weight": "linear",
        "proj.bias": "bias",
        "head.weight": "output",
        "head.bias": "bias",
    }


def test_get_output_embeddings_wins_over_shapes() -> None:
    """With `get_output_embeddings`, only that module is the head (the same-shaped decoy is not)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.decoy, self.out = nn.Embedding(10, 4), nn.Linear(4, 10), nn.Linear(4, 7)

        def get_output_embeddings(self) -> nn.Module:
            return self.out

    roles = _roles(Model())
    assert (roles["out.weight"], roles["decoy.weight"]) == ("output", "linear")


def test_norms_conv_bias_and_other() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.gn = nn.GroupNorm(2, 4)
            self.rms = MyRMSNorm(4)
            self.pos_table = nn.Parameter(torch.zeros(7, 4))
            self.gate_bias = nn.Parameter(torch.zeros(4))
            self.temperature = nn.Parameter(torch.tensor(1.0))

    infos = _infos(Model())
    assert {n: i.role for n, i in infos.items()} == {
        "pos_table": "other",
        "gate_bias": "bias",
        "temperature": "other",
        "conv.weight": "conv",
        "conv.bias": "bias",
        "bn.weight": "norm",
        "bn.bias": "bias",
        "gn.weight": "norm",
        "gn.bias": "bias",
        "rms.weight": "norm",
    }
    assert "'pos_table' registered directly on a Model" in infos["pos_table"].fallback
    assert infos["temperature"].shape == ()


def test_mlp_versus_linear() -> None:
    """MLP by class name (any case) or MLP child names; other Linears are `linear`."""

    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

    model = nn.ModuleDict({"ff": FeedForward(), "gated": GatedMLP(4, 8), "plain": nn.Sequential(nn.Linear(4, 4))})
    roles = _roles(model)
    assert roles["ff.a.weight"] == "mlp"
    assert roles["gated.up_proj.weight"] == "mlp"
    assert roles["plain.0.weight"] == "linear"


def test_frozen_parameters_are_left_out() -> None:
    model = LlamaLikeAttention()
    model.v_proj.requires_grad_(False)
    assert "v_proj.weight" not in _infos(model)
    assert "q_proj.weight" in _infos(model)


def test_meta_device_matches_cpu() -> None:
    """Only shapes are read: the meta model is described exactly like the real one."""
    with torch.device("meta"):
        meta = TinyGPT()
    assert next(meta.parameters()).is_meta
    assert describe_parameters(meta) == describe_parameters(TinyGPT())


# ------------------------------------------------------------------------------------------------
# Head-count helpers


def test_find_head_counts_prefers_module_then_config() -> None:
    module = nn.Module()
    module.n_head = 8
    parent = nn.Module()
    parent.config = SimpleNamespace(num_attention_heads=2, num_key_value_heads=1, head_dim=None)
    assert find_head_counts(module, [parent]) == HeadCounts(num_heads=8, num_kv_heads=1, head_dim=None)
    module.n_head = True  # a bool is not a head count
    assert find_head_counts(module, [parent]).num_heads == 2


@pytest.mark.parametrize(
    ("counts", "q_rows", "head_dim"),
    [
        (HeadCounts(num_heads=4, head_dim=16), 64, 16),
        (HeadCounts(num_heads=4), 48, 12),
        (HeadCounts(head_dim=16), 64, 16),  # head_dim alone is enough
        (HeadCounts(num_heads=4, head_dim=10), 48, 12),  # explicit head_dim does not divide: derive
        (HeadCounts(num_heads=5), 48, None),
        (HeadCounts(), 48, None),
    ],
)
def test_resolve_head_dim(counts: HeadCounts, q_rows: int, head_dim: int | None) -> None:
    assert resolve_head_dim(counts, q_rows) == head_dim


@pytest.mark.parametrize(
    ("counts", "rows", "expected"),
    [
        (HeadCounts(num_heads=4), 96, ((32, 32, 32), 8)),
        (HeadCounts(num_heads=4, num_kv_heads=2, head_dim=16), 128, ((64, 32, 32), 16)),
        (HeadCounts(num_heads=4, num_kv_heads=2), 128, ((64, 32, 32), 16)),
        (HeadCounts(num_heads=3), 100, None),
        (HeadCounts(), 96, None),
    ],
)
def test_fused_qkv_rows(counts: HeadCounts, rows: int, expected: tuple | None) -> None:
    assert fused_qkv_rows(counts, rows) == expected


# ------------------------------------------------------------------------------------------------
# Real transformers models, built from configs on the meta device (no download)


def test_gpt2_from_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    infos = _infos(model)
    c_attn = infos["transformer.h.0.attn.c_attn.weight"]
    assert (c_attn.role, c_attn.shape, c_attn.transposed, c_attn.qkv_rows, c_attn.head_dim) == (
        "qkv", (64, 192), True, (64, 64, 64), 16
    )
    c_proj, c_fc = infos["transformer.h.1.attn.c_proj.weight"], infos["transformer.h.0.mlp.c_fc.weight"]
    assert (c_proj.role, c_proj.transposed, c_fc.role, c_fc.transposed) == ("attn_out", True, "mlp", True)
    assert infos["transformer.wte.weight"].role == "tied_embedding"
    assert infos["transformer.wte.weight"].aliases == ("lm_head.weight",)
    assert infos["transformer.wpe.weight"].role == "embedding"
    assert all(info.fallback is None for info in infos.values())


def test_llama_from_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    infos = _infos(model)
    attn = "model.layers.0.self_attn."
    assert (infos[attn + "q_proj.weight"].role, infos[attn + "q_proj.weight"].head_dim) == ("query", 16)
    assert (infos[attn + "k_proj.weight"].role, infos[attn + "k_proj.weight"].shape) == ("key", (32, 48))
    assert infos[attn + "o_proj.weight"].role == "attn_out"
    assert infos["model.layers.1.mlp.down_proj.weight"].role == "mlp"
    assert infos["model.layers.0.input_layernorm.weight"].role == "norm"
    assert infos["model.embed_tokens.weight"].role == "embedding"
    assert infos["lm_head.weight"].role == "output"
    assert all(info.fallback is None for info in infos.values())
