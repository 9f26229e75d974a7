"""MicroAdam: the math step for step, the edge cases, the state format and its round trip, training."""

from __future__ import annotations

import copy
import math
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from lightning_lowmem import MicroAdam
from lightning_lowmem.optim.micro_adam_functional import (
    block_offsets,
    dequantize_4bit,
    init_state,
    micro_adam_layout,
    micro_adam_update_,
    quantize_4bit,
    topk_count,
)

BETAS = (0.9, 0.999)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one thread avoids oversubscription on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=gen).to(dtype))


# ---- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"betas": (1.0, 0.999)}, "Invalid beta1: 1.0"),
        ({"eps": float("nan")}, "Invalid epsilon: nan"),
        ({"window": 0}, "Invalid window: 0"),
        ({"density": 0.0}, "Invalid density: 0.0"),
        ({"density": float("nan")}, "Invalid density: nan"),
        ({"density": 1.5}, "Invalid density: 1.5"),
        ({"block_size": 0}, "Invalid block_size: 0"),
        ({"block_size": 65536}, r"Invalid block_size: 65536 \(must be an int in \[1, 32768\]"),
        ({"quant_bucket": 63}, "Invalid quant_bucket: 63"),
        ({"min_compressed_numel": 0}, "Invalid min_compressed_numel: 0"),
        ({"backend": "cuda"}, "Invalid backend 'cuda'; choose one of 'auto', 'torch', 'compile', 'triton'"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroAdam([_param(8)], **kwargs)


def test_layout_counts():
    assert topk_count(4096, 0.01) == 41
    assert topk_count(63, 0.01) == 1  # at least one per block
    assert topk_count(4096, 1e-12) == 1
    assert topk_count(100, 0.07) == 7  # no float noise rounding 7.000000000000001 up
    assert topk_count(5, 1.0) == 5
    layout = micro_adam_layout(2 * 4096 + 300)
    assert (layout.k, layout.k_last, layout.topk_per_row) == (41, 3, 85)
    assert (layout.num_blocks, layout.num_buckets, layout.packed_numel) == (3, 133, 4246)
    assert micro_adam_layout(8192).k_last == 0


# ---- the math ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_first_step_is_sign_on_exactly_k_coordinates_per_block(dtype, eps):
    """t = 1: u = V / |V| on the top-k of each block (k = 11 of 1024, 3 of the 300 left), 0 elsewhere.

    Exact for eps = 0, and for eps = 1e-8 because every selected |g| exceeds eps * 2**25.
    """
    block, density, d = 1024, 0.01, 3 * 1024 + 300
    param = nn.Parameter(torch.zeros(d, dtype=dtype))
    grad = _param(d, dtype=dtype, seed=1).detach()
    param.grad = grad.clone()
    opt = MicroAdam([param], lr=1.0, eps=eps, density=density, block_size=block, min_compressed_numel=1, backend="torch")
    opt.step()
    update = -param.detach().float()
    starts = list(range(0, d, block))
    for start in starts:
        u, g = update[start : start + block], grad[start : start + block].float()
        k = topk_count(u.numel(), density)
        assert int((u != 0).sum()) == k
        assert set(u[u != 0].abs().tolist()) == {1.0}
        top = g.abs().topk(k).indices
        assert set(top.tolist()) == set(u.nonzero().view(-1).tolist())
        assert torch.equal(u[top], g[top].sign())


def _expected_u(t: int, m: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    if t <= m:
        return 1.0
    return ((1 - beta1**m) / (1 - beta1**t)) / math.sqrt((1 - beta2**m) / (1 - beta2**t))


def test_constant_selected_gradient_gives_the_windowed_adam_sequence():
    """g = 1 on one coordinate (always selected, k = 1), 0 elsewhere: u_t = 1 for t <= m, then a closed form.

    The closed form is 0.9953 at t = 11, 1.0460 at t = 20 and 1.5785 at t = 60 (beta = 0.9, 0.999, m = 10).
    """
    param = nn.Parameter(torch.zeros(64))
    opt = MicroAdam([param], lr=1.0, betas=BETAS, eps=0.0, window=10, min_compressed_numel=1, backend="torch")
    grad = torch.zeros(64)
    grad[5] = 1.0
    got = []
    for _ in range(60):
        param.data.zero_()
        param.grad = grad.clone()
        opt.step()
        got.append(-param[5].item())
        assert int((param != 0).sum()) == 1
    want = [_expected_u(t, 10) for t in range(1, 61)]
    assert got == pytest.approx(want, rel=2e-6)
    assert (got[10], got[19], got[59]) == pytest.approx((0.99527, 1.04598, 1.57853), abs=1e-5)
    assert opt.state[param]["step"].item() == 60.0


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


def _naive_micro_adam(p0, grads, *, window, density, block, bucket, lr, beta1, beta2, eps, wd):
    """MicroAdam with a Python loop over every coordinate, bucket and block, sums in float64.

    Rounds where the format does (fp32 accumulator, bf16 values and min/max) so the selections agree.
    """
    d = len(p0)
    p = [float(x) for x in p0]
    err = [0.0] * d
    rows: list[dict[int, float]] = []
    for t, g in enumerate(grads, start=1):
        a = [_f32(_f32(g[i]) + err[i]) for i in range(d)]
        selected: dict[int, float] = {}
        for start in range(0, d, block):
            idx = list(range(start, min(start + block, d)))
            for i in sorted(idx, key=lambda i: -abs(a[i]))[: topk_count(len(idx), density)]:
                selected[i] = _bf16(a[i])
                a[i] = 0.0
        rows = (rows + [selected])[-window:]
        for start in range(0, d, bucket):
            chunk = a[start : start + bucket]
            lo, hi = _bf16(min(chunk)), _bf16(max(chunk))
            scale = _f32((hi - lo) / 15)
            for i, x in enumerate(chunk):
                code = 0 if scale == 0 else min(15, max(0, math.floor(_f32(_f32(x - lo) / scale) + 0.5)))
                err[start + i] = _f32(lo + _f32(code * scale))
        c1, c2 = (1 - beta1) / (1 - beta1**t), (1 - beta2) / (1 - beta2**t)
        for i in range(d):
            p[i] *= 1 - lr * wd
            m_sum = sum(beta1**age * row.get(i, 0.0) for age, row in enumerate(reversed(rows)))
            s_sum = sum(beta2**age * row.get(i, 0.0) ** 2 for age, row in enumerate(reversed(rows)))
            if m_sum or s_sum:
                p[i] -= lr * c1 * m_sum / (math.sqrt(c2 * s_sum) + eps)
    return p


def test_reference_matches_a_coordinate_loop():
    """The vectorised reference equals a per-coordinate loop over 12 steps (window 4 wraps around)."""
    d, settings = 70, dict(window=4, density=0.1, block=32, bucket=8, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.1)
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(d, generator=gen)
    grads = [torch.randn(d, generator=gen) for _ in range(12)]
    want = _naive_micro_adam(p0.tolist(), [g.tolist() for g in grads], **settings)

    param = nn.Parameter(p0.clone())
    opt = MicroAdam([param], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, window=4, density=0.1,
                    block_size=32, quant_bucket=8, min_compressed_numel=1, backend="torch")
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_error_feedback_tracks_the_sum_of_gradients():
    """Each step conserves g_t + deq(e_{t-1}) = V_t + deq(e_t) up to that step's quantisation bound, so
    sum_t V_t + deq(e_T) tracks sum_t g_t within the sum of the bounds.

    A step's bound, per coordinate: half a quantisation step of its bucket, (max - min) / 30, plus the
    bf16 rounding (<= 2**-9 relative, 2**-8 here) of the bucket's min/max and of a selected value.
    """
    d, steps = 4097, 40
    layout = micro_adam_layout(d, block_size=1024, density=0.01, quant_bucket=64)
    param = torch.zeros(d)
    indices, values, error, lo, hi = state = init_state(param, layout, window=4)
    offsets = block_offsets(layout, param.device)
    gen = torch.Generator().manual_seed(0)
    grad_sum, applied, total_bound = (torch.zeros(d, dtype=torch.float64) for _ in range(3))
    for t in range(1, steps + 1):
        grad = torch.randn(d, generator=gen) * (1 + torch.arange(d) % 7)
        before = dequantize_4bit(error, lo, hi, d, 64).double()
        micro_adam_update_(param, grad, *state, float(t), layout=layout, lr=0.0, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.0)
        row = (t - 1) % 4
        selected = torch.zeros(d, dtype=torch.float64).index_add_(0, indices[row].long() + offsets, values[row].double())
        after = dequantize_4bit(error, lo, hi, d, 64).double()
        half_step = (hi.double() - lo.double()) / 30
        rounding = torch.maximum(lo.double().abs(), hi.double().abs()) * 2**-8
        bound = (half_step + rounding).repeat_interleave(64)[:d] + selected.abs() * 2**-8 + 1e-6
        assert bool(((selected + after - grad.double() - before).abs() <= bound).all()), t
        grad_sum += grad.double()
        applied += selected
        total_bound += bound
    gap = (applied + dequantize_4bit(error, lo, hi, d, 64).double() - grad_sum).abs()
    assert bool((gap <= total_bound).all())
    assert bool((applied != 0).sum() > 0.2 * d)  # many coordinates were applied, not a trivial pass


# ---- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 63, 65, 4097])
def test_quantisation_round_trip_within_half_a_step(d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)) * 3
    packed, lo, hi = quantize_4bit(x, 64)
    assert (packed.dtype, lo.dtype, hi.dtype) == (torch.uint8, torch.bfloat16, torch.bfloat16)
    assert packed.numel() == (d + 1) // 2 and lo.numel() == -(-d // 64)
    back = dequantize_4bit(packed, lo, hi, d, 64)
    lo_e, hi_e = (v.float().repeat_interleave(64)[:d] for v in (lo, hi))
    bound = (hi_e - lo_e) / 30 + torch.maximum(lo_e.abs(), hi_e.abs()) * 2**-8
    assert bool(((back - x).abs() <= bound).all())


def test_constant_bucket_is_exact_and_finite():
    """max == min: code 0, dequantised to the min exactly; an all-zero tensor stays zero."""
    x = torch.full((130,), 0.375)
    packed, lo, hi = quantize_4bit(x, 64)
    assert bool((packed == 0).all()) and bool((lo == hi).all())
    assert torch.equal(dequantize_4bit(packed, lo, hi, 130, 64), x)
    zeros = quantize_4bit(torch.zeros(5), 64)
    assert torch.equal(dequantize_4bit(*zeros, 5, 64), torch.zeros(5))


@pytest.mark.parametrize("d", [1, 63, 65, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awkward_sizes_step_finite_before_and_after_the_window_fills(d, dtype):
    """d of 1, below a bucket, not a multiple of the bucket or of the block; 5 steps of a window of 3."""
    param = _param(d, dtype=dtype)
    opt = MicroAdam([param], lr=1e-2, window=3, block_size=1024, min_compressed_numel=1, backend="torch")
    before = param.detach().clone()
    for step in range(5):
        param.grad = _param(d, dtype=dtype, seed=step + 1).detach()
        opt.step()
        assert bool(torch.isfinite(param).all())
    assert not torch.equal(param.detach(), before)
    state = opt.state[param]
    layout = micro_adam_layout(d, block_size=1024)
    assert tuple(state["window_indices"].shape) == (3, layout.topk_per_row)
    assert int(state["window_indices"].max()) < 1024


def test_tiny_density_keeps_one_coordinate_per_block():
    param = nn.Parameter(torch.zeros(2 * 256 + 10))
    param.grad = _param(522, seed=1).detach()
    opt = MicroAdam([param], lr=1.0, eps=0.0, density=1e-9, block_size=256, min_compressed_numel=1, backend="torch")
    opt.step()
    assert [int((param[s : s + 256] != 0).sum()) for s in (0, 256, 512)] == [1, 1, 1]


def test_constant_gradient_buckets_are_finite():
    """Every bucket but those holding a selected coordinate has max == min."""
    param = nn.Parameter(torch.zeros(4097))
    opt = MicroAdam([param], lr=0.1, min_compressed_numel=1, backend="torch")
    for _ in range(3):
        param.grad = torch.full((4097,), 0.5)
        opt.step()
    assert bool(torch.isfinite(param).all())
    state = opt.state[param]
    assert bool((state["error_min"] == state["error_max"]).any())


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_zero_gradients_do_not_make_nan(eps):
    param = _param(5000)
    before = param.detach().clone()
    opt = MicroAdam([param], lr=0.1, eps=eps, min_compressed_numel=1, backend="torch")
    param.grad = torch.zeros(5000)
    opt.step()
    assert torch.equal(param.detach(), before)


def test_get_optimizer_state_dict_fake_step_makes_no_nan():
    """torch.distributed.checkpoint's fake step: zero grads and lr = 0 on an empty state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = nn.Sequential(nn.Linear(80, 64), nn.Linear(64, 3))
    before = copy.deepcopy(model.state_dict())
    opt = MicroAdam(model, lr=1e-3, weight_decay=0.1, backend="torch")
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved["state"]["0.weight"]) == {"step", "window_indices", "window_values", "error", "error_min", "error_max"}
    for tensor in (*model.state_dict().values(), *(v for s in opt.state.values() for v in s.values())):
        assert bool(torch.isfinite(tensor.float()).all())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# ---- small parameters, state format --------------------------------------------------------------


def test_small_parameters_keep_adamw_state_and_follow_adamw():
    """Below one block (4096) a parameter keeps exp_avg/exp_avg_sq and steps exactly like torch's AdamW."""
    model = nn.Linear(100, 50)  # weight 5000: compressed; bias 50: AdamW
    opt = MicroAdam(model, lr=1e-2, weight_decay=0.1, backend="torch")
    assert opt.compressed_names() == ["weight"]
    summary = opt.summary()
    assert "compressed" in summary.splitlines()[1] and "adamw" in summary.splitlines()[2]
    twin = nn.Parameter(model.bias.detach().clone())
    adamw = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grad = _param(50, seed=step).detach()
        model.weight.grad, model.bias.grad, twin.grad = torch.randn(50, 100), grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    assert set(opt.state[model.bias]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(model.bias, twin, rtol=1e-6, atol=1e-7)


def test_state_is_at_most_one_byte_per_parameter():
    """768 x 3072 at the defaults: 0.963 bytes/param allocated, as planned; GPT-2 small as a whole <= 1.0."""
    param = nn.Parameter(torch.zeros(768, 3072))
    opt = MicroAdam([param], backend="torch")
    planned = opt.state_bytes()
    param.grad = torch.randn(768, 3072)
    opt.step()
    state = opt.state[param]
    assert {k: v.dtype for k, v in state.items()} == {
        "step": torch.float32, "window_indices": torch.int16, "window_values": torch.bfloat16,
        "error": torch.uint8, "error_min": torch.bfloat16, "error_max": torch.bfloat16,
    }
    allocated = sum(v.numel() * v.element_size() for v in state.values())
    assert allocated == planned == opt.state_bytes()
    assert allocated / param.numel() == pytest.approx(0.9629, abs=1e-4)

    shapes = [(50257, 768), (1024, 768), (768,), (768,)]  # wte (tied head), wpe, ln_f
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                   (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    gpt2 = [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    opt = MicroAdam(gpt2)
    numel = sum(p.numel() for p in gpt2)
    assert numel == 124_439_808
    assert opt.state_bytes() / numel <= 1.0


def _trained(dtype: torch.dtype = torch.float32, **kwargs) -> tuple[nn.Module, MicroAdam]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 3)).to(dtype)
    opt = MicroAdam(model, lr=1e-2, weight_decay=0.1, window=3, backend="torch", **kwargs)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 80, dtype=dtype)).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_keeps_dtypes_and_continues_identically(dtype):
    model, opt = _trained(dtype)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = MicroAdam(twin, lr=1e-2, weight_decay=0.1, window=3, backend="torch")
    twin_opt.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p].items():
            assert twin_opt.state[q][key].dtype == value.dtype, key
            assert torch.equal(twin_opt.state[q][key], value), key
    assert twin_opt.state[twin[0].weight]["window_indices"].dtype == torch.int16
    assert twin_opt.state[twin[0].weight]["error"].dtype == torch.uint8
    assert twin_opt.state[twin[0].weight]["step"].item() == 4.0
    x = torch.randn(8, 80, dtype=dtype)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_loading_another_optimizers_state_names_the_parameter_and_key():
    model, opt = _trained()
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 80)).sum().backward()
    adamw.step()
    with pytest.raises(ValueError, match=r"for '0\.weight': it has the keys \['exp_avg', 'exp_avg_sq', 'step'\].*"
                                         r"missing \['error', 'error_max'"):
        opt.load_state_dict(adamw.state_dict())

    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["window_indices"] = saved["state"][0]["window_indices"].int()
    with pytest.raises(ValueError, match=r"for '0\.weight': 'window_indices' is torch\.int32, MicroAdam stores it as torch\.int16"):
        opt.load_state_dict(saved)

    other = MicroAdam(model, window=5, backend="torch")
    with pytest.raises(ValueError, match=r"saved with window=3, this MicroAdam has window=5"):
        other.load_state_dict(opt.state_dict())


# ---- behaviour -----------------------------------------------------------------------------------


def test_maximize_and_per_group_lr():
    a, b = _param(5000), _param(5000)
    frozen = _param(5000, seed=2)
    opt = MicroAdam([{"params": [a]}, {"params": [b], "maximize": True}, {"params": [frozen], "lr": 0.0}],
                    lr=1.0, eps=0.0, min_compressed_numel=1, backend="torch")
    start = [t.detach().clone() for t in (a, b, frozen)]
    grad = _param(5000, seed=1).detach()
    for t in (a, b, frozen):
        t.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(a - start[0], -(b - start[1]))
    assert torch.equal(frozen.detach(), start[2])


def test_closure_is_called_and_its_loss_returned():
    param = _param(10)
    opt = MicroAdam([param], backend="torch")

    def closure():
        opt.zero_grad()
        loss = param.square().sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0
    assert opt.state[param]["step"].item() == 1.0


def _regression_losses(make_opt, steps: int = 200, dtype: torch.dtype = torch.float32) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=gen)
    y = torch.sin(x @ torch.randn(32, 1, generator=gen) / 4) + 0.1 * x[:, :1] ** 2
    x, y = x.to(dtype), y.to(dtype)
    opt = make_opt(model)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mlp_trains_comparably_to_adamw():
    """200 steps at the default 1% density: MicroAdam ends below where AdamW was after 50 steps."""
    adamw = _regression_losses(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0))
    micro = _regression_losses(lambda m: MicroAdam(m, lr=1e-3, backend="torch"))
    assert micro[0] == adamw[0]
    assert micro[-1] < 0.3 * micro[0]
    assert micro[-1] < adamw[49]


def test_bf16_parameters_train():
    losses = _regression_losses(lambda m: MicroAdam(m, lr=3e-3, backend="torch"), steps=60, dtype=torch.bfloat16)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0]


def test_compile_backend_matches_the_reference():
    """Compiled (no fallback to eager allowed) equals eager on a block plus a one-element block."""
    param, twin = _param(4097), _param(4097)
    eager = MicroAdam([param], lr=1e-2, window=3, min_compressed_numel=1, backend="torch")
    compiled = MicroAdam([twin], lr=1e-2, window=3, min_compressed_numel=1, backend="compile")
    for step in range(4):
        grad = _param(4097, seed=step + 1).detach()
        param.grad, twin.grad = grad.clone(), grad.clone()
        eager.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compilation warns, then runs eagerly
            compiled.step()
    torch.testing.assert_close(twin, param, rtol=1e-5, atol=1e-6)
    assert torch.equal(compiled.state[twin]["window_indices"], eager.state[param]["window_indices"])


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error():
    script = textwrap.dedent(
        """
        import torch
        from lightning_lowmem import MicroAdam
        p = torch.nn.Parameter(torch.randn(5000))
        p.grad = torch.randn(5000)
        try:
            MicroAdam([p], backend="triton").step()
        except RuntimeError as err:
            print(err)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert "need CUDA tensors, got a tensor on cpu" in out.stdout, out.stderr
    assert "TRITON_INTERPRET=1 at the start of the process" in out.stdout
