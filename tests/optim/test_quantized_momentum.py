"""AdamMini and Eve with bf16, int8 and int4 momentum: state, fidelity, state dicts and conversion."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

from lightning_lowmem.optim import AdamMini, Eve

FORMATS = ["bf16", "int8", "int4"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 40)
        self.fc = nn.Linear(40, 200)
        self.out = nn.Linear(200, 50)
        self.norm = nn.LayerNorm(50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.norm(self.out(torch.tanh(self.fc(self.embed(idx)))))


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (16, 8), generator=gen) for _ in range(n)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> float:
    for idx in batches:
        loss = nn.functional.cross_entropy(model(idx).reshape(-1, 50), ((idx * 7 + 3) % 50).reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.mark.parametrize("name", FORMATS)
def test_state_holds_codes_and_scales_and_1d_tensors_keep_fp32(name):
    model = Net()
    optimizer = AdamMini(model, lr=1e-2, exp_avg_dtype=name, exp_avg_block=16, backend="torch")
    _train(model, optimizer, _batches(1))
    fc, bias = optimizer.state[model.fc.weight], optimizer.state[model.fc.bias]
    expected = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[name]
    assert fc["exp_avg"].dtype == expected
    if name == "bf16":
        assert set(fc) == {"step", "exp_avg", "exp_avg_sq"} and bias["exp_avg"].dtype == torch.bfloat16
    else:
        assert fc["exp_avg"].shape == ((200, 40) if name == "int8" else (200, 20))
        assert fc["exp_avg_scale"].shape == (200, 3) and fc["exp_avg_scale"].dtype == torch.float32
        assert set(bias) == {"step", "exp_avg", "exp_avg_sq"} and bias["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(("name", "tolerance"), [("bf16", 0.002), ("int8", 0.002), ("int4", 0.03)])
@pytest.mark.parametrize("optimizer_class", [AdamMini, Eve])
def test_training_follows_fp32_momentum(optimizer_class, name, tolerance):
    batches = _batches(40)
    losses = {}
    for dtype in ("fp32", name):
        model = Net()
        losses[dtype] = _train(model, optimizer_class(model, lr=1e-2, exp_avg_dtype=dtype, exp_avg_block=32), batches)
    assert losses["fp32"] < 0.5  # it learns (from 3.9)
    assert abs(losses[name] - losses["fp32"]) < tolerance


@pytest.mark.parametrize("name", FORMATS)
def test_state_dict_round_trip_through_torch_save_resumes_exactly(name):
    batches = _batches(6)
    model = Net()
    optimizer = AdamMini(model, lr=1e-2, exp_avg_dtype=name, backend="torch")
    _train(model, optimizer, batches[:3])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    twin = copy.deepcopy(model)
    resumed = AdamMini(twin, lr=1e-2, exp_avg_dtype=name, backend="torch")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in optimizer.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype and torch.equal(resumed.state[q][key], value)
    _train(model, optimizer, batches[3:])
    _train(twin, resumed, batches[3:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bf16_model_state_keeps_fp32_scales_and_int8_codes():
    model = Net().to(torch.bfloat16)
    optimizer = AdamMini(model, lr=1e-2, exp_avg_dtype="int8", stochastic_rounding=True)
    _train(model, optimizer, _batches(2))
    resumed = AdamMini(copy.deepcopy(model), lr=1e-2, exp_avg_dtype="int8", stochastic_rounding=True)
    resumed.load_state_dict(optimizer.state_dict())
    state = resumed.state[resumed.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_scale"].dtype == torch.float32


@pytest.mark.parametrize(("saved", "loaded"), [("fp32", "int8"), ("int8", "fp32"), ("int8", "int4"), ("bf16", "int8")])
def test_a_checkpoint_of_another_momentum_dtype_is_converted_with_one_log_line(saved, loaded, caplog):
    model = Net()
    optimizer = AdamMini(model, lr=1e-2, exp_avg_dtype=saved, backend="torch")
    _train(model, optimizer, _batches(3))
    other = AdamMini(copy.deepcopy(model), lr=1e-2, exp_avg_dtype=loaded, backend="torch")
    with caplog.at_level(logging.INFO, logger="lightning_lowmem.optim.momentum_state"):
        other.load_state_dict(optimizer.state_dict())
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_lowmem.optim.momentum_state"]
    assert len(lines) == 1 and f"{saved} -> {loaded}" in lines[0].replace(" (block 128)", "")
    assert other.param_groups[0]["exp_avg_dtype"] == loaded
    # the momentum is the same up to the coarser format's quantization
    probe = AdamMini(copy.deepcopy(model), lr=1e-2, exp_avg_dtype="fp32", backend="torch")
    probe.load_state_dict(other.state_dict())
    reference = AdamMini(copy.deepcopy(model), lr=1e-2, exp_avg_dtype="fp32", backend="torch")
    reference.load_state_dict(optimizer.state_dict())
    for p, q in zip(probe.param_groups[0]["params"], reference.param_groups[0]["params"]):
        m, m_ref = probe.state[p]["exp_avg"], reference.state[q]["exp_avg"]
        coarse = 0.16 if "int4" in (saved, loaded) else 0.01
        assert (m - m_ref).abs().max() <= coarse * m_ref.abs().max() + 1e-12


def test_saved_momentum_formats_holds_the_saved_format_within_and_converts_back_on_exit(caplog):
    from lightning_lowmem.optim.momentum_state import saved_momentum_formats

    model = Net()
    saved = AdamMini(model, lr=1e-2, exp_avg_dtype="fp32", backend="torch")
    _train(model, saved, _batches(3))
    live = copy.deepcopy(model)
    optimizer = AdamMini(live, lr=1e-2, exp_avg_dtype="int8", exp_avg_block=16, backend="torch")
    _train(live, optimizer, _batches(1))  # live int8 state, re-encoded on entry
    fc = live.fc.weight
    with caplog.at_level(logging.INFO, logger="lightning_lowmem.optim.momentum_state"):
        with saved_momentum_formats(optimizer, saved.state_dict()["param_groups"]):
            assert [g["exp_avg_dtype"] for g in optimizer.param_groups] == ["fp32", "fp32"]
            assert optimizer.state[fc]["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in optimizer.state[fc]
            optimizer.load_state_dict(saved.state_dict())  # what a template of the saved layout is loaded with
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and "fp32 -> int8 (block 16)" in lines[0], lines
    assert [g["exp_avg_dtype"] for g in optimizer.param_groups] == ["int8", "int8"]
    state, reference = optimizer.state[fc], saved.state[model.fc.weight]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_scale"].shape == (200, 3)
    assert torch.equal(state["exp_avg_sq"], reference["exp_avg_sq"]) and state["step"] == reference["step"]
    m = optimizer.state_dict()  # decoded back through an fp32 optimizer: the saved momentum up to int8 rounding
    probe_model = copy.deepcopy(model)
    probe = AdamMini(probe_model, lr=1e-2, exp_avg_dtype="fp32", backend="torch")
    probe.load_state_dict(m)
    decoded = probe.state[probe_model.fc.weight]["exp_avg"]
    assert (decoded - reference["exp_avg"]).abs().max() <= reference["exp_avg"].abs().max() / 254 + 1e-12


def test_saved_momentum_formats_restores_the_formats_and_drops_the_state_if_loading_fails():
    from lightning_lowmem.optim.momentum_state import saved_momentum_formats

    model = Net()
    optimizer = AdamMini(model, lr=1e-2, exp_avg_dtype="int8", backend="torch")
    _train(model, optimizer, _batches(1))
    with pytest.raises(RuntimeError, match="load failed"):
        with saved_momentum_formats(optimizer, [{"exp_avg_dtype": "bf16"}, {"exp_avg_dtype": "bf16"}]):
            assert optimizer.state[model.fc.weight]["exp_avg"].dtype == torch.bfloat16
            raise RuntimeError("load failed")
    assert [g["exp_avg_dtype"] for g in optimizer.param_groups] == ["int8", "int8"] and not optimizer.state
    _train(model, optimizer, _batches(1))  # fresh int8 state
    assert optimizer.state[model.fc.weight]["exp_avg"].dtype == torch.int8


def test_a_momentum_that_does_not_fit_its_saved_dtype_is_refused():
    model = Net()
    optimizer = AdamMini(model, lr=1e-2, exp_avg_dtype="int8")
    _train(model, optimizer, _batches(1))
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["state"][1]["exp_avg"] = state_dict["state"][1]["exp_avg"].to(torch.uint8)
    with pytest.raises(ValueError, match=r"'\w+\.weight': 'exp_avg' is torch.uint8, but exp_avg_dtype='int8' keeps torch.int8"):
        AdamMini(copy.deepcopy(model), exp_avg_dtype="int8").load_state_dict(state_dict)
    state_dict = copy.deepcopy(optimizer.state_dict())
    del state_dict["state"][1]["exp_avg_scale"]
    with pytest.raises(ValueError, match=r"Cannot convert the saved momentum of '\w+\.weight': 'exp_avg_scale' is None"):
        AdamMini(copy.deepcopy(model), exp_avg_dtype="fp32").load_state_dict(state_dict)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(exp_avg_dtype="int3"), "Invalid exp_avg_dtype: 'int3'; choose one of 'fp32', 'bf16', 'int8', 'int4'."),
    (dict(exp_avg_dtype="int4", exp_avg_block=127), "Invalid exp_avg_block for int4: 127 (must be even"),
])
@pytest.mark.parametrize("optimizer_class", [AdamMini, Eve])
def test_bad_values_are_refused(optimizer_class, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        optimizer_class(Net(), **kwargs)


def test_stochastic_rounding_lets_a_bf16_model_learn_with_small_updates():
    """lr 1e-4 on weights of about 1: every update is below half a bf16 step."""
    results = {}
    for rounding in (False, True):
        model = Net()
        with torch.no_grad():
            model.fc.weight.add_(1.0)  # bf16 steps of 2**-7 around 1: 78 updates of 1e-4
        model = model.to(torch.bfloat16)
        before = model.fc.weight.detach().float().clone()
        optimizer = AdamMini(model, lr=1e-4, weight_decay=0.0, exp_avg_dtype="bf16", stochastic_rounding=rounding)
        _train(model, optimizer, _batches(20))
        results[rounding] = (model.fc.weight.float() - before).abs().mean().item()
    assert results[False] < 1e-4 < results[True]  # about 20 updates of 1e-4 accumulated, in either direction
