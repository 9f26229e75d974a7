"""The optimizer registry: names -> factories, identical decay groups, plan_of, registering a new one."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_lowmem import AdamMini, Eve, MicroAdam, OptimConfig
from lightning_lowmem.optim.adamw import NamedAdamW
from lightning_lowmem.optim.registry import (
    OPTIMIZERS,
    available_optimizers,
    create_optimizer,
    plan_of,
    register_optimizer,
)


class Attention(nn.Module):
    """GPT-2 style: fused ``c_attn`` (Q, K, V rows) with ``n_head``, output ``c_proj``."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in self.c_attn(x).split(d, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class TinyGPT(nn.Module):
    """Embedding, 2 blocks (LayerNorm, attention, MLP), final norm, head tied to the embedding: 928 params."""

    def __init__(self, vocab: int = 11, dim: int = 8, n_head: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(dim), "attn": Attention(dim, n_head), "fc": nn.Linear(dim, dim)})
            for _ in range(2)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block["attn"](block["ln"](x))
            x = x + torch.tanh(block["fc"](x))
        return self.lm_head(self.ln_f(x))


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 11, (2, 5), generator=gen)
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _groups(optimizer: torch.optim.Optimizer) -> list[tuple[list[str], float]]:
    return [(group["param_names"], group["weight_decay"]) for group in optimizer.param_groups]


def test_builtin_names():
    assert available_optimizers()[:4] == ("adamw", "adam_mini", "adam_mini_paper", "eve")


@pytest.mark.parametrize(
    ("name", "cls", "preset"),
    [("adamw", NamedAdamW, None), ("adam_mini", AdamMini, "adam_mini"),
     ("adam_mini_paper", AdamMini, "adam_mini_paper"), ("eve", Eve, "eve"), ("micro_adam", MicroAdam, None)],
)
def test_create_optimizer_builds_the_named_optimizer_with_the_config(name, cls, preset):
    cfg = OptimConfig(name=name, lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3, backend="torch")
    optimizer = create_optimizer(_model(), cfg)
    assert type(optimizer) is cls
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (0.02, (0.8, 0.9), 1e-6)
    assert [wd for _, wd in _groups(optimizer)] == [0.3, 0.0]
    plan = plan_of(optimizer)
    assert (plan is None) if preset is None else (plan.preset == preset)


def test_every_optimizer_gets_the_same_decay_groups():
    names = available_optimizers()
    assert "micro_adam" in names
    groups = {name: _groups(create_optimizer(_model(), {"name": name, "backend": "torch"})) for name in names}
    assert all(groups[name] == groups["adamw"] for name in names)
    decayed, kept = (names for names, _ in groups["adamw"])
    assert decayed == ["blocks.0.attn.c_attn.weight", "blocks.0.attn.c_proj.weight", "blocks.0.fc.weight",
                       "blocks.1.attn.c_attn.weight", "blocks.1.attn.c_proj.weight", "blocks.1.fc.weight"]
    assert "wte.weight" in kept and "blocks.0.ln.weight" in kept and "blocks.1.fc.bias" in kept
    assert "lm_head.weight" not in decayed + kept  # tied: counted once, under the embedding's name


def test_no_decay_roles_change_the_groups():
    optimizer = create_optimizer(_model(), {"name": "adamw", "no_decay": ["bias"]})
    decayed, kept = _groups(optimizer)
    assert "wte.weight" in decayed[0] and "blocks.0.ln.weight" in decayed[0]
    assert all(name.endswith("bias") for name in kept[0])
    (everything,) = _groups(create_optimizer(_model(), {"name": "adamw", "no_decay": []}))
    assert everything[1] == 0.01 and len(everything[0]) == len(list(_model().parameters()))


def test_adamw_skips_frozen_parameters():
    model = _model()
    model.blocks[0].requires_grad_(False)
    names = [n for group in create_optimizer(model, {"name": "adamw"}).param_groups for n in group["param_names"]]
    assert not any(name.startswith("blocks.0.") for name in names) and "blocks.1.fc.weight" in names


def test_adam_mini_with_full_blocks_equals_adamw_from_the_registry():
    """Same groups and hyperparameters: AdamMini with every block elementwise must be AdamW.

    In float64: the key bias gets gradients at round-off level (softmax ignores it), which Adam
    divides by about ``eps``; in float32 that turns round-off into 1e-3 differences, in float64 into
    1e-11. A wrong update would be off by about ``lr`` = 1e-2.
    """
    cfg = {"lr": 0.01, "weight_decay": 0.1, "backend": "torch"}
    ref, mini = _model().double(), _model().double()
    _train(ref, create_optimizer(ref, {**cfg, "name": "adamw"}))
    _train(mini, create_optimizer(mini, {**cfg, "name": "adam_mini", "rules": {".*": "full"}}))
    for (name, a), b in zip(ref.named_parameters(), mini.parameters()):
        assert not torch.equal(a, _model().double().get_parameter(name)), name  # it did train
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)


def test_rules_reach_the_plan():
    optimizer = create_optimizer(_model(), {"name": "adam_mini", "rules": {r"c_proj\.weight$": "tensor"}})
    assert plan_of(optimizer)["blocks.0.attn.c_proj.weight"].kind == "tensor"
    assert plan_of(optimizer)["blocks.0.fc.weight"].kind == "row"
    assert plan_of(optimizer)["blocks.0.attn.c_attn.weight"].kind == "mixed"  # Q, K by head; V by row


def test_dict_dataclass_and_dictconfig_give_the_same_optimizer():
    data = {"name": "eve", "lr": 0.05, "betas": [0.85, 0.98], "weight_decay": 0.2, "backend": "torch"}
    built = [create_optimizer(_model(), form) for form in (data, OptimConfig(**data), OmegaConf.create(data))]
    first = built[0]
    for optimizer in built:
        assert type(optimizer) is Eve
        assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for g in first.param_groups
        ]
        assert str(plan_of(optimizer)) == str(plan_of(first))


def test_plan_of_other_optimizers_is_none():
    assert plan_of(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)) is None


def test_registering_a_new_optimizer():
    @register_optimizer("toy_sgd")
    def _toy(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)

    try:
        optimizer = create_optimizer(_model(), {"name": "toy_sgd", "lr": 0.3})
        assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["lr"] == 0.3
        with pytest.raises(ValueError, match=re.escape("An optimizer named 'toy_sgd' is already registered (")):
            register_optimizer("toy_sgd")(_toy)
    finally:
        del OPTIMIZERS["toy_sgd"]
    with pytest.raises(ValueError, match="Invalid optimizer name: 'toy_sgd'"):
        create_optimizer(_model(), {"name": "toy_sgd"})


def test_register_rejects_an_empty_name():
    with pytest.raises(ValueError, match=re.escape("An optimizer name must be a non-empty string, got ''.")):
        register_optimizer("")
