"""Tests of the nanoGPT-style reference model."""

import pytest
import torch

from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.partition import build_plan


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.tiny(**{"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, cfg.vocab_size) and loss is None
    _, loss = model(idx, torch.randint(0, cfg.vocab_size, (3, 16)))
    # At GPT-2 initialisation the prediction is nearly uniform: loss close to log(vocab_size).
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_forward_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    assert torch.allclose(model(idx)[0][:, :10], model(changed)[0][:, :10], atol=1e-6)
    assert not torch.allclose(model(idx)[0][:, 10:], model(changed)[0][:, 10:], atol=1e-6)


def test_too_long_sequence_raises():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_decreases_in_a_few_steps():
    torch.manual_seed(0)
    model = GPT(tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = GPT(GPTConfig.gpt2_small())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_params() == 124_439_808  # GPT-2 small, tied head counted once


def test_tied_weights():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(tiny(tie_weights=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == model.num_params() + 256 * 32


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=256, n_head=4, n_layer=8))
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_fc - 0.02) < 1e-3
    assert abs(std_proj - 0.02 / 4) < 1e-3  # 0.02 / sqrt(2 * n_layer)
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


def test_partitioner_reads_the_attention_heads():
    with torch.device("meta"):
        model = GPT(tiny(n_head=4, n_embd=64))
    plan = build_plan(model, "adam_mini")
    qkv = plan["transformer.h.0.attn.c_attn.weight"]
    assert qkv.role == "qkv"
    assert plan["lm_head.weight"] is plan["transformer.wte.weight"]  # tied: one entry


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd \\(30\\) must be divisible by n_head \\(4\\)"),
        ({"n_layer": 0}, "n_layer must be a positive int, got 0"),
        ({"vocab_size": 2.5}, "vocab_size must be a positive int, got 2.5"),
        ({"dropout": 1.0}, "dropout must be in \\[0, 1\\), got 1.0"),
        ({"dropout": float("nan")}, "dropout must be in \\[0, 1\\), got nan"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)
