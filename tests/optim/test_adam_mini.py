"""AdamMini and Eve as optimizers: construction, checks, groups, closures, state dicts."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import nn

from lightning_lowmem.optim import AdamMini, BlockAdam, Eve
from lightning_lowmem.partition import BlockPlan, BlockSpec, ParamBlocks


class TinyTransformer(nn.Module):
    """Embedding, one attention layer (fused in_proj), an MLP, a norm, a tied head."""

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 3)  # rows do not split evenly in two
        self.out = nn.Linear(3, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.out(torch.relu(self.fc(self.norm(x))))
        return self.head(x)


def _loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def _train(model, opt, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 6), generator=gen)
        opt.zero_grad()
        loss = _loss(model, idx)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


BAD_HPARAMS = [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(betas=(1.0, 0.999)), "Invalid beta1: 1.0"),
    (dict(betas=(float("nan"), 0.999)), "Invalid beta1: nan"),
    (dict(betas=(0.9, -0.1)), "Invalid beta2: -0.1"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=-1e-8), "Invalid epsilon: -1e-08"),
    (dict(weight_decay=-0.1), "Invalid weight_decay: -0.1"),
    (dict(weight_decay=float("nan")), "Invalid weight_decay: nan"),
    (dict(backend="cuda"), "Invalid backend 'cuda'"),
    (dict(preset="adam"), "Invalid preset for AdamMini: 'adam'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_HPARAMS)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdamMini(TinyTransformer(), **kwargs)


def test_plain_tensors_without_names_are_refused():
    with pytest.raises(ValueError, match="needs parameter names"):
        AdamMini(TinyTransformer().parameters())


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex parameters"):
        AdamMini([("z", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))], plan=BlockPlan([ParamBlocks.single("z", (3,), BlockSpec("full"))]))


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = AdamMini(emb, backend="torch")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_plan_for_other_shapes_or_names_is_refused():
    model = TinyTransformer()
    other = TinyTransformer(dim=4)
    with pytest.raises(ValueError, match="built for other shapes"):
        AdamMini(model, plan=AdamMini(other).plan)
    partial = BlockPlan([ParamBlocks.single("norm.weight", (8,), BlockSpec("tensor"))])
    with pytest.raises(ValueError, match="has no entry for"):
        AdamMini(model, plan=partial)


def test_model_trains_and_state_is_smaller_than_adamw():
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = AdamMini(model, lr=1e-2, backend="torch")
    losses = _train(model, opt, steps=30)
    assert losses[-1] < losses[0] - 0.3
    state_numel = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    n_params = sum(p.numel() for p in model.parameters())
    assert state_numel < 2 * n_params
    assert all(s["step"].item() == 30 and torch.is_tensor(s["step"]) for s in opt.state.values())


def test_no_decay_groups_follow_roles():
    model = TinyTransformer()
    opt = AdamMini(model, weight_decay=0.1)
    by_decay = {g["weight_decay"]: set(g["param_names"]) for g in opt.param_groups}
    assert "attn.in_proj_bias" in by_decay[0.0] and "norm.weight" in by_decay[0.0] and "embed.weight" in by_decay[0.0]
    assert "attn.in_proj_weight" in by_decay[0.1] and "fc.weight" in by_decay[0.1]
    everything = AdamMini(model, weight_decay=0.1, no_decay=())
    assert len(everything.param_groups) == 1


def test_parameters_without_gradient_and_frozen_parameters_get_no_state():
    torch.manual_seed(0)
    model = TinyTransformer()
    model.norm.weight.requires_grad_(False)
    unused = nn.Linear(2, 2)
    model.unused = unused
    opt = AdamMini(model, lr=1e-2, backend="torch")
    assert "norm.weight" not in {n for g in opt.param_groups for n in g["param_names"]}
    before = unused.weight.detach().clone()
    _train(model, opt, steps=3)
    assert unused.weight not in opt.state and model.norm.weight not in opt.state
    assert torch.equal(unused.weight, before)


def test_closure_returns_loss_and_per_group_lr_is_used():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(4, 3))
    plan = BlockPlan([ParamBlocks.single(n, (4, 3), BlockSpec("row")) for n in ("a", "b")])
    opt = BlockAdam([{"params": [("a", a)], "lr": 0.1}, {"params": [("b", b)], "lr": 0.01}], plan=plan, weight_decay=0.0, backend="torch")

    def closure():
        opt.zero_grad()
        loss = (a.sum() + b.sum())
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 24.0
    # first Adam step moves every entry by lr (the gradient is constant within each row)
    torch.testing.assert_close(a.detach(), torch.full((4, 3), 0.9), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), torch.full((4, 3), 0.99), atol=1e-6, rtol=0)


def test_lr_scheduler_changes_the_step():
    p = nn.Parameter(torch.zeros(3, 2))
    opt = BlockAdam([("p", p)], lr=1.0, weight_decay=0.0, plan=BlockPlan([ParamBlocks.single("p", (3, 2), BlockSpec("row"))]), backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    moves = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(3, 2)
        opt.step()
        sched.step()
        moves.append((before - p.detach()).abs().max().item())
    assert moves == pytest.approx([1.0, 0.5, 0.25], rel=1e-6)


def test_rosenbrock_descends():
    def rosenbrock(xy):
        x, y = xy[0], xy[1]
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    for kind in ("tensor", "row"):
        xy = nn.Parameter(torch.tensor([-1.5, 2.0]))
        opt = BlockAdam([("xy", xy)], lr=1e-2, weight_decay=0.0, plan=BlockPlan([ParamBlocks.single("xy", (2,), BlockSpec(kind))]), backend="torch")
        start = rosenbrock(xy).item()
        for _ in range(2000):
            opt.zero_grad()
            rosenbrock(xy).backward()
            opt.step()
        assert rosenbrock(xy).item() < 0.05 * start, kind


def _state_after_steps(make_opt, steps):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = make_opt(model)
    _train(model, opt, steps=steps)
    return model, opt


@pytest.mark.parametrize("make_opt", [lambda m: AdamMini(m, lr=1e-2, backend="torch"), lambda m: Eve(m, lr=1e-2, backend="torch")], ids=["adam_mini", "eve"])
def test_state_dict_round_trip_resumes_exactly(make_opt):
    model, opt = _state_after_steps(make_opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state tensors are live; keep this step's values
    _train(model, opt, steps=3, seed=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = TinyTransformer()
    resumed.load_state_dict(saved_model)
    opt2 = make_opt(resumed)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, steps=3, seed=1)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_loading_state_of_another_optimizer_or_plan_names_the_parameter():
    model, adamw = _state_after_steps(lambda m: torch.optim.AdamW(m.named_parameters()), 1)
    with pytest.raises(ValueError, match="param groups"):
        AdamMini(model).load_state_dict(adamw.state_dict())
    one_group = AdamMini(model, no_decay=())
    with pytest.raises(ValueError, match=r"'embed.weight': 'exp_avg_sq' has shape \[11, 8\].*expects \[11\]"):
        one_group.load_state_dict(adamw.state_dict())

    _, mini = _state_after_steps(lambda m: AdamMini(m, backend="torch"), 1)
    with pytest.raises(ValueError, match="another optimizer or partition"):
        AdamMini(model, preset="adam_mini_paper").load_state_dict(mini.state_dict())


def test_load_keeps_fp32_second_moment_of_bf16_model():
    model, opt = _state_after_steps(lambda m: AdamMini(m.to(torch.bfloat16), backend="torch"), 1)
    sd = opt.state_dict()
    opt2 = AdamMini(model, backend="torch")
    opt2.load_state_dict(sd)
    dtypes = {(k, t.dtype) for s in opt2.state.values() for k, t in s.items() if k != "step"}
    assert ("exp_avg_sq", torch.float32) in dtypes and ("exp_avg_sq", torch.bfloat16) not in dtypes
    assert ("exp_avg", torch.bfloat16) in dtypes


def test_eve_keeps_one_value_per_row_of_linear_weights():
    model = TinyTransformer()
    opt = Eve(model, backend="torch")
    _train(model, opt, steps=1)
    state = {n: opt.state[p] for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    assert state["fc.weight"]["exp_avg_sq"].shape == (3,)
    assert state["embed.weight"]["exp_avg_sq"].shape == (11,)  # tied with the output head: a Linear
    assert state["norm.weight"]["exp_avg_sq"].shape == (8,)  # elementwise
    assert state["fc.bias"]["exp_avg_sq"].shape == (3,)


def test_named_parameters_fallback_and_explicit_groups_with_plan():
    model = TinyTransformer()
    opt = AdamMini(model.named_parameters(), backend="torch")
    assert len(opt.plan) == len(list(model.parameters()))
    plan = AdamMini(model).plan
    groups = [{"params": [(n, p) for n, p in model.named_parameters()], "lr": 0.5}]
    grouped = AdamMini(groups, plan=plan)
    assert len(grouped.param_groups) == 1 and grouped.param_groups[0]["lr"] == 0.5
    assert math.isclose(grouped.param_groups[0]["weight_decay"], 1e-2)


def test_helpers_moved_out_of_block_adam_are_importable_from_it():
    from lightning_lowmem.optim import param_groups, placement

    block_adam = importlib.import_module("lightning_lowmem.optim.block_adam")  # the package's block_adam is the function
    assert block_adam.layout_for is placement.layout_for
    assert block_adam.model_decay_groups is param_groups.model_decay_groups
