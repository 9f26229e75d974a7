"""Every optimizer of the package through one table of ``torch.optim`` properties.

Modelled on torch's own optimizer tests (``torch.testing._internal.common_optimizers``): one list of
optimizers (:data:`OPTIMIZERS`), and each test a property every one of them must have, compared
with what ``torch.optim.AdamW`` does where torch defines the behaviour.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_lowmem.optim import AdamMini, Eve, MicroAdam, NamedAdamW

VOCAB, DIM = 11, 8
#: MicroAdam settings that compress this model's matrices (the defaults compress only >= 4096 elements).
MICRO = dict(min_compressed_numel=32, block_size=16, density=0.25, window=4, quant_bucket=4)


class Tiny(nn.Module):
    """Embedding, ``nn.MultiheadAttention`` (2 heads of 4 rows), LayerNorm, output head.

    The attention has no biases: softmax ignores the key bias, so its gradient is 0 up to round-off,
    which Adam's ``m / sqrt(v)`` turns into full-size steps that differ between any two roundings.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True, bias=False)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


Factory = Callable[..., torch.optim.Optimizer]

#: ``name -> factory(params, **kwargs)``; ``params`` is a model, named parameters or named groups.
OPTIMIZERS: dict[str, Factory] = {
    "adam_mini": lambda params, **kw: AdamMini(params, **{"backend": "torch", **kw}),
    "adam_mini_paper": lambda params, **kw: AdamMini(params, **{"preset": "adam_mini_paper", "backend": "torch", **kw}),
    "eve": lambda params, **kw: Eve(params, **{"backend": "torch", **kw}),
    "micro_adam": lambda params, **kw: MicroAdam(params, **{**MICRO, "backend": "torch", **kw}),
}
NAMES = list(OPTIMIZERS)
#: ``backend="auto"`` (the C kernel on CPU) for the block optimizers.
AUTO = {name: (lambda f: lambda params, **kw: f(params, **{**kw, "backend": "auto"}))(OPTIMIZERS[name]) for name in ("adam_mini", "eve")}


def model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 6), generator=gen) for _ in range(n)]


def train(net: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for idx in data:
        opt.zero_grad()
        loss = net(idx)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_params(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:  # fp32 round-off only: a wrong lr moves weights by ~1e-2 here
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for key, state in sa["state"].items():
        assert state.keys() == sb["state"][key].keys()
        for name, value in state.items():
            assert value.dtype == sb["state"][key][name].dtype, (key, name)
            assert torch.equal(value, sb["state"][key][name]), (key, name)


def named_groups(net: nn.Module, **second: Any) -> list[dict[str, Any]]:
    """Two named groups: the attention, and the rest with ``second``'s settings."""
    attn = [(n, p) for n, p in net.named_parameters() if n.startswith("attn.")]
    rest = [(n, p) for n, p in net.named_parameters() if not n.startswith("attn.")]
    return [{"params": attn}, {"params": rest, **second}]


# ---- the optimizer goes the right way ----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loss_goes_down_and_up_with_maximize(name):
    data = batches(1) * 15  # one batch over and over: the loss must go down (up when maximizing)
    net = model()
    losses = train(net, OPTIMIZERS[name](net, lr=0.01), data)
    assert losses[-1] < 0.9 * losses[0]
    net = model()
    losses = train(net, OPTIMIZERS[name](net, lr=0.01, maximize=True), data)
    assert losses[-1] > 1.1 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negated_gradient(name):
    nets = model(), model()
    opts = OPTIMIZERS[name](nets[0], lr=0.01, maximize=True), OPTIMIZERS[name](nets[1], lr=0.01)
    for idx in batches(4):
        for net, opt, sign in zip(nets, opts, (1.0, -1.0)):
            opt.zero_grad()
            (sign * net(idx)).backward()
            opt.step()
    assert_same_params(*nets)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr(name):
    nets = model(), model()
    opts = OPTIMIZERS[name](nets[0], lr=torch.tensor(0.01)), OPTIMIZERS[name](nets[1], lr=0.01)
    for net, opt in zip(nets, opts):
        train(net, opt, batches(4))
    assert_same_params(*nets, exact=False)  # lr * x and tensor(lr) * x may round differently


# ---- steps, closures, groups -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_closure_loss_is_returned_and_steps_like_backward(name):
    nets = model(), model()
    opts = OPTIMIZERS[name](nets[0], lr=0.01), OPTIMIZERS[name](nets[1], lr=0.01)
    train(nets[1], opts[1], batches(3))
    for idx in batches(3):
        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            opts[0].zero_grad()
            loss = nets[0](idx)
            loss.backward()
            return loss

        loss = opts[0].step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert_same_params(*nets)
    assert opts[0].step() is None


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_keep_their_own_lr(name):
    net = model()
    opt = OPTIMIZERS[name](named_groups(net, lr=0.0), lr=0.01)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    train(net, opt, batches(3))
    for n, p in net.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == n.startswith("attn."), n  # lr 0: not even weight decay moves a parameter


@pytest.mark.parametrize("name", NAMES)
def test_step_is_a_float32_tensor_counting_steps(name):
    net = model()
    opt = OPTIMIZERS[name](net, lr=0.01)
    train(net, opt, batches(3))
    steps = [state["step"] for state in opt.state.values()]
    assert steps and all(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.item() == 3 for s in steps)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_skipped(name):
    net = model()
    opt = OPTIMIZERS[name](net, lr=0.01)
    before = net.head.weight.detach().clone()
    for idx in batches(2):
        opt.zero_grad()  # set_to_none: the head's grad stays None after the next line clears it
        net(idx).backward()
        net.head.weight.grad = None
        opt.step()
    assert torch.equal(net.head.weight, before)
    assert net.head.weight not in opt.state or not opt.state[net.head.weight]
    assert opt.state[net.head.bias]["step"].item() == 2


@pytest.mark.parametrize("name", NAMES)
def test_zero_grads_move_nothing_without_weight_decay(name):
    net = model()
    opt = OPTIMIZERS[name](net, lr=0.01, weight_decay=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # what torch.distributed.checkpoint's get_optimizer_state_dict does on an empty state
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)
    assert all(state["step"].item() == 1 for state in opt.state.values())


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_fills_defaults_and_trains_the_new_params(name):
    net = model()
    net.norm.requires_grad_(False)  # a frozen layer, unfrozen later
    opt = OPTIMIZERS[name](net, lr=0.01, weight_decay=0.1)
    assert all(p is not net.norm.weight for g in opt.param_groups for p in g["params"])
    net.norm.requires_grad_(True)
    opt.add_param_group({"params": list(net.norm.parameters()), "lr": 0.02})
    group = opt.param_groups[-1]
    assert group["param_names"] == ["norm.weight", "norm.bias"]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.02, 0.1, opt.defaults["betas"])
    before = net.norm.weight.detach().clone()
    train(net, opt, batches(2))
    assert not torch.equal(net.norm.weight, before)
    assert opt.state[net.norm.weight]["step"].item() == 2


@pytest.mark.parametrize("name", NAMES)
def test_plain_tensors_added_after_load_state_dict_are_named(name):
    """``load_state_dict`` (which Lightning calls on resume) keeps what names new groups: the model."""
    net = model()
    net.norm.requires_grad_(False)
    opt = OPTIMIZERS[name](net, lr=0.01)
    train(net, opt, batches(1))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    net.norm.requires_grad_(True)
    opt.add_param_group({"params": list(net.norm.parameters())})
    assert opt.param_groups[-1]["param_names"] == ["norm.weight", "norm.bias"]


# ---- copies, pickles and state dicts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "how", "factories"),
    [(name, how, OPTIMIZERS) for name in NAMES for how in ("deepcopy", "pickle", "torch.save")]
    + [(name, "deepcopy", AUTO) for name in AUTO],
    ids=[f"{name}-{how}" for name in NAMES for how in ("deepcopy", "pickle", "torch.save")] + [f"{n}-deepcopy-auto" for n in AUTO],
)
def test_a_copy_steps_equal_to_the_original(name, how, factories):
    net = model()
    opt = factories[name](net, lr=0.01)
    train(net, opt, batches(2))
    if how == "deepcopy":
        net2, opt2 = copy.deepcopy((net, opt))
    elif how == "pickle":
        net2, opt2 = pickle.loads(pickle.dumps((net, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((net, opt), buffer)
        buffer.seek(0)
        net2, opt2 = torch.load(buffer, weights_only=False)
    copied = {id(p) for p in net2.parameters()}  # the copy optimizes the copied model, not the original
    assert all(id(p) in copied for g in opt2.param_groups for p in g["params"])
    data = batches(3, seed=2)
    train(net, opt, data)
    train(net2, opt2, data)
    assert_same_params(net, net2)
    assert_same_state(opt, opt2)
    assert getattr(opt2, "plan", None) == getattr(opt, "plan", None) and opt2.backend == opt.backend


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_then_equal_steps(name):
    net = model()
    opt = OPTIMIZERS[name](net, lr=0.01)
    train(net, opt, batches(3))
    net2 = model(seed=5)
    net2.load_state_dict(net.state_dict())
    opt2 = OPTIMIZERS[name](net2, lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_same_state(opt, opt2)
    data = batches(3, seed=2)
    train(net, opt, data)
    train(net2, opt2, data)
    assert_same_params(net, net2)
    assert_same_state(opt, opt2)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_keeps_saved_dtypes_on_bf16_params(name):
    """torch casts floating state to the parameter's dtype on load; fp32 moments and packed state must survive."""
    net = model().to(torch.bfloat16)
    opt = OPTIMIZERS[name](net, lr=0.01)
    train(net, opt, batches(2))
    saved = copy.deepcopy(opt.state_dict())
    opt2 = OPTIMIZERS[name](net, lr=0.01)
    opt2.load_state_dict(saved)
    for key, state in saved["state"].items():
        for k, value in state.items():
            loaded = opt2.state_dict()["state"][key][k]
            assert loaded.dtype == value.dtype and torch.equal(loaded, value), (key, k)
    dtypes = {v.dtype for s in saved["state"].values() for k, v in s.items() if k == "exp_avg_sq"}
    assert dtypes <= {torch.float32}  # the second moment is fp32 for bf16 parameters


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_names_every_parameter(name):
    net = model()
    opt = OPTIMIZERS[name](net)
    names = [n for g in opt.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_hooks_run_around_step_and_repr_lists_groups(name):
    net = model()
    opt = OPTIMIZERS[name](net, lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(net, opt, batches(1))
    assert calls == ["pre", "post"]
    assert re.search(r"Parameter Group 0\n.*lr: 0\.01", repr(opt), re.S)


# ---- inputs refused, with the message a user needs ---------------------------------------------

#: (kwargs, exception, exact message) every optimizer gives.
BAD_INPUTS = [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0 (must be >= 0)."),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan (must be >= 0)."),
    (dict(lr=torch.tensor([0.1, 0.1])), ValueError, "Tensor lr must be 1-element, got 2 elements."),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta1: 1.0 (must be in [0, 1))."),
    (dict(betas=(0.9, float("nan"))), ValueError, "Invalid beta2: nan (must be in [0, 1))."),
    (dict(betas=(0.9,)), ValueError, "betas must be a pair (beta1, beta2), got (0.9,)."),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon: -1e-08 (must be >= 0)."),
    (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay: nan (must be >= 0)."),
    (dict(foreach=True), ValueError, "{cls} does not take foreach=True: the update already runs over all tensors of a "
     "group at once; pick the implementation with backend='auto' (Triton on CUDA, the C kernel on CPU), 'triton', "
     "'compile' or 'torch'."),
    (dict(fused=True), ValueError, "{cls} does not take fused=True: the fused kernels are chosen with backend='auto' "
     "(Triton on CUDA, the C kernel on CPU) or backend='triton'."),
    (dict(capturable=True), ValueError, "{cls} does not take capturable=True: steps read hyperparameters on the host, "
     "so they cannot be captured in a CUDA graph; run optimizer.step() outside the graph."),
    (dict(differentiable=True), ValueError, "{cls} does not take differentiable=True: the step runs under "
     "torch.no_grad() and updates in place; for gradients through the update use "
     "torch.optim.AdamW(differentiable=True)."),
    (dict(amsgrad=True), TypeError, "{cls}.__init__() got an unexpected keyword argument 'amsgrad'"),
]
MICRO_BAD_INPUTS = [
    (dict(window=0), "Invalid window: 0 (must be an int >= 1: the number of sparse gradients kept)."),
    (dict(density=float("nan")), "Invalid density: nan (must be in (0, 1]: the fraction of each block kept)."),
    (dict(quant_bucket=3), "Invalid quant_bucket: 3 (must be an even int >= 2: two 4-bit codes share a byte)."),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS, ids=[str(k) for k, _, _ in BAD_INPUTS])
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused_with_their_message(name, kwargs, error, message):
    net = model()
    cls = type(OPTIMIZERS[name](net))
    with pytest.raises(error, match=f"^{re.escape(message.format(cls=cls.__name__))}$"):
        OPTIMIZERS[name](net, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), MICRO_BAD_INPUTS)
def test_bad_micro_adam_inputs(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OPTIMIZERS["micro_adam"](model(), **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_torch_switches_that_ask_for_nothing_are_accepted(name):
    net = model()
    opt = OPTIMIZERS[name](net, foreach=None, fused=False, capturable=False, differentiable=False)
    assert not any(key in opt.defaults for key in ("foreach", "fused", "capturable", "differentiable"))


@pytest.mark.parametrize("name", NAMES)
def test_params_torch_refuses_are_refused_alike(name):
    net = model()
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable of Tensors or dicts"):
        OPTIMIZERS[name](net.head.weight)
    head = [("head.weight", net.head.weight)]
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        OPTIMIZERS[name]([{"params": head}, {"params": head}])
    with pytest.raises(ValueError, match="empty parameter list"):
        OPTIMIZERS[name]([])


# ---- AdamW where the math is AdamW's -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(weight_decay=0.0), dict(weight_decay=0.1), dict(weight_decay=0.1, maximize=True), dict(lr=torch.tensor(0.01))],
    ids=["no_decay", "decay", "maximize", "tensor_lr"],
)
def test_every_block_full_is_adamw_bit_for_bit(kwargs):
    """With every block elementwise, AdamMini's eager path is ``torch.optim.AdamW`` (fp32, 20 steps, ``torch.equal``)."""
    kwargs = {"lr": 0.01, **kwargs}
    nets = model(), model()
    ours = AdamMini(nets[0].named_parameters(), rules={".": "full"}, no_decay=(), backend="torch", **kwargs)
    ref = torch.optim.AdamW(nets[1].parameters(), foreach=False, **kwargs)
    data = batches(20)
    train(nets[0], ours, data)
    train(nets[1], ref, data)
    assert_same_params(*nets)


def test_named_adamw_is_adamw_step_for_step():
    nets = model(), model()
    ours = NamedAdamW(nets[0], lr=0.01, weight_decay=0.1, no_decay=())
    ref = torch.optim.AdamW(nets[1].parameters(), lr=0.01, weight_decay=0.1)
    data = batches(5)
    train(nets[0], ours, data)
    train(nets[1], ref, data)
    assert_same_params(*nets)
    assert math.isclose(ours.param_groups[0]["lr"], 0.01)
