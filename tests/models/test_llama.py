"""Tests of the compact Llama: forward/backward, causality, RoPE, GQA, head sizes the partitioner reads."""

import math

import pytest
import torch

from lightning_lowmem.models.llama import Llama, LlamaConfig, apply_rotary, rotary_cos_sin
from lightning_lowmem.partition import build_plan


def test_forward_backward_tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny()
    model = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, cfg.vocab_size) and loss is None
    _, loss = model(idx, torch.randint(0, cfg.vocab_size, (3, 20)))
    # N(0, 0.02) weights: the prediction is nearly uniform, the loss close to log(vocab_size).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_forward_is_causal():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    assert torch.allclose(model(idx)[0][:, :10], model(changed)[0][:, :10], atol=1e-6)
    assert not torch.allclose(model(idx)[0][:, 10:], model(changed)[0][:, 10:], atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(40), 16, 10000.0, torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    assert torch.allclose(score(7, 3), score(30, 26))
    assert torch.allclose(score(0, 0), q @ k)  # position 0 is the identity
    assert not torch.allclose(score(7, 3), score(7, 4))
    # a rotation keeps the norm
    assert torch.allclose(apply_rotary(q, cos[13], sin[13]).norm(), q.norm())


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """A GQA model equals the MHA model whose K/V projections repeat each KV head for its query group."""
    torch.manual_seed(0)
    gqa = Llama(LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=2)).eval()
    mha = Llama(LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=4)).eval()
    state = gqa.state_dict()
    head_dim = gqa.config.head_dim
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(2, head_dim, -1)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 12))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


def test_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(tie_word_embeddings=True)
    ours = Llama(cfg).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(ours.state_dict())  # same parameter names, strict
    idx = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-5)


def test_partitioner_reads_heads_and_tied_head():
    model = Llama(LlamaConfig.tiny(tie_word_embeddings=True))  # 4 heads, 2 KV heads of 16
    plan = build_plan(model, "adam_mini")
    q, k = plan["model.layers.0.self_attn.q_proj.weight"], plan["model.layers.0.self_attn.k_proj.weight"]
    assert (q.role, str(q.segments[0][0]), q.state_numel) == ("query", "head:16", 4)
    assert (k.role, str(k.segments[0][0]), k.state_numel) == ("key", "head:16", 2)
    assert plan["model.layers.1.mlp.gate_proj.weight"].role == "mlp"
    assert plan["model.layers.1.self_attn.o_proj.weight"].role == "attn_out"
    assert plan["model.norm.weight"].role == "norm"
    assert plan["lm_head.weight"] is plan["model.embed_tokens.weight"]  # one entry for the tied weight
    assert plan["lm_head.weight"].role == "tied_embedding"
    assert plan.num_params == model.num_params()


def test_head_dim_other_than_hidden_over_heads():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(head_dim=24))  # 4 x 24 = 96 != hidden 64
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (96, 64)
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (64, 96)
    logits, _ = model(torch.randint(0, 256, (1, 8)))
    assert logits.shape == (1, 8, 256)
    assert str(build_plan(model)["model.layers.0.self_attn.q_proj.weight"].segments[0][0]) == "head:24"


def test_meta_device_build_counts_llama2_7b_without_memory():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == 6_738_415_616
    assert all(p.is_meta for p in model.parameters())


def test_biases_when_asked():
    model = Llama(LlamaConfig.tiny(attention_bias=True, mlp_bias=True))
    names = {n for n, _ in model.named_parameters()}
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.down_proj.bias"} <= names
    assert "model.layers.0.self_attn.q_proj.bias" not in {n for n, _ in Llama(LlamaConfig.tiny()).named_parameters()}


def test_too_long_sequence_raises():
    model = Llama(LlamaConfig.tiny(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings is 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
        (dict(hidden_size=66), r"hidden_size \(66\) is not divisible by num_attention_heads \(4\); give head_dim"),
        (dict(head_dim=15), r"head_dim must be even"),
        (dict(num_hidden_layers=0), r"LlamaConfig.num_hidden_layers must be a positive int, got 0"),
        (dict(vocab_size=True), r"LlamaConfig.vocab_size must be a positive int, got True"),
        (dict(head_dim=-2), r"LlamaConfig.head_dim must be a positive int, got -2"),
        (dict(rms_norm_eps=float("nan")), r"rms_norm_eps must be > 0, got nan"),
        (dict(rope_theta=0.0), r"rope_theta must be > 0, got 0.0"),
    ],
)
def test_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**overrides)


def test_config_defaults():
    cfg = LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == (8, 8, False)
