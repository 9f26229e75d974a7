"""MicroAdam: the math step for step, the row-aligned layout, the edge cases, the state format and its round
trip, training. (Sharded runs: ``test_micro_adam_sharded.py``.)"""

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
from lightning_lowmem.kernels.micro_adam import micro_adam_update_
from lightning_lowmem.kernels.micro_adam_error_feedback import dequantize_4bit, quantize_4bit
from lightning_lowmem.kernels.micro_adam_layout import init_state, micro_adam_layout, topk_count
from lightning_lowmem.kernels.micro_adam_packing import pack_window_entries, unpack_window_entries
from lightning_lowmem.kernels.micro_adam_window import block_offsets

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
        ({"error_feedback": 1}, r"Invalid error_feedback: 1 \(must be True or False\)"),
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
    # a row of 2 * 4096 + 300 is cut into 3 near-equal blocks (2831, 2831, 2830), not 4096, 4096, 300
    layout = micro_adam_layout(5, 2 * 4096 + 300)
    assert (layout.block_len, layout.full_blocks, layout.blocks_per_row) == (2831, 2, 3)
    assert (layout.k, layout.k_last, layout.topk_per_row) == (29, 29, 87)
    assert (layout.buckets_per_row, layout.packed_per_row) == (133, 4246)
    assert layout.state_shapes(10) == {"window": (5, 10, 87), "error": (5, 4246), "error_min": (5, 133), "error_max": (5, 133)}
    assert layout.with_rows(2).state_shapes(10)["window"] == (2, 10, 87)
    assert micro_adam_layout(3, 8192).k_last == 0 and micro_adam_layout(3, 8192).block_len == 4096
    assert micro_adam_layout(3, 4097)[2:5] == (2049, 21, 21)  # no block of one coordinate
    short = micro_adam_layout(7, 768)  # a row shorter than block_size is one block
    assert (short.block_len, short.k, short.k_last, short.topk_per_row) == (768, 8, 0, 8)


@pytest.mark.parametrize("cols", [1, 5, 16, 17, 4095, 4097, 12289, 50257])
@pytest.mark.parametrize("block_size", [16, 4096])
def test_blocks_tile_each_row_with_near_equal_lengths(cols, block_size):
    """Blocks cover a row exactly, number ceil(cols / block_size), none longer than block_size, and
    differ in length by fewer coordinates than there are blocks."""
    layout = micro_adam_layout(3, cols, block_size=block_size)
    lengths = [layout.block_len] * layout.full_blocks + ([cols % layout.block_len] if cols % layout.block_len else [])
    assert sum(lengths) == cols
    assert len(lengths) == layout.blocks_per_row == -(-cols // block_size)
    assert max(lengths) <= block_size
    assert max(lengths) - min(lengths) < len(lengths)
    assert layout.topk_per_row == sum(topk_count(n, 0.01) for n in lengths)


def test_window_entries_hold_an_int16_index_and_a_bf16_value():
    indices = torch.tensor([0, 1, 32767, 4095])
    values = torch.tensor([-0.0, 1.0 + 2**-8, -3.0e-30, 65504.0])  # a tie rounds to even, tiny, large
    got_indices, got_values = unpack_window_entries(pack_window_entries(indices, values))
    assert got_indices.tolist() == indices.tolist()
    assert torch.equal(got_values, values.to(torch.bfloat16).float())


# ---- the math ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_first_step_is_sign_on_exactly_k_coordinates_per_block(dtype, eps):
    """t = 1: u = V / |V| on the top-k of each block of each row, 0 elsewhere.

    Rows of 3 * 1024 + 300 with block_size 1024: 4 blocks of 843 per row, 9 kept in each. Exact
    for eps = 0, and for eps = 1e-8 because every selected |g| exceeds eps * 2**25.
    """
    block, density, rows, cols = 1024, 0.01, 3, 3 * 1024 + 300
    param = nn.Parameter(torch.zeros(rows, cols, dtype=dtype))
    grad = _param(rows, cols, dtype=dtype, seed=1).detach()
    param.grad = grad.clone()
    opt = MicroAdam([param], lr=1.0, eps=eps, density=density, block_size=block, min_compressed_numel=1, backend="torch")
    opt.step()
    update = -param.detach().float()
    length = 843
    for r in range(rows):
        for start in range(0, cols, length):
            u, g = update[r, start : start + length], grad[r, start : start + length].float()
            assert u.numel() == length and topk_count(length, density) == 9
            assert int((u != 0).sum()) == 9
            assert set(u[u != 0].abs().tolist()) == {1.0}
            top = g.abs().topk(9).indices
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
    param = nn.Parameter(torch.zeros(1, 64))
    opt = MicroAdam([param], lr=1.0, betas=BETAS, eps=0.0, window=10, min_compressed_numel=1, backend="torch")
    grad = torch.zeros(1, 64)
    grad[0, 5] = 1.0
    got = []
    for _ in range(60):
        param.data.zero_()
        param.grad = grad.clone()
        opt.step()
        got.append(-param[0, 5].item())
        assert int((param != 0).sum()) == 1
    want = [_expected_u(t, 10) for t in range(1, 61)]
    assert got == pytest.approx(want, rel=2e-6)
    assert (got[10], got[19], got[59]) == pytest.approx((0.99527, 1.04598, 1.57853), abs=1e-5)
    assert opt.state[param]["step"].item() == 60.0


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


def _naive_micro_adam(p0, grads, *, cols, window, density, block, bucket, lr, beta1, beta2, eps, wd, feedback=True):
    """MicroAdam with a Python loop over every coordinate, bucket and block, sums in float64.

    ``p0`` and the gradients are flat lists of rows of ``cols``; each row is cut into
    ceil(cols / block) blocks of ceil(cols / blocks) (the last holds the rest) and buckets of
    ``bucket`` (the last may be shorter), written out here from the definition. Rounds where the
    format does (fp32 accumulator, bf16 values and min/max) so the selections agree. Without
    ``feedback`` the error stays 0 (a = g).
    """
    d = len(p0)
    blocks = -(-cols // block)
    block_len = -(-cols // blocks)
    p = [float(x) for x in p0]
    err = [0.0] * d
    ring: list[dict[int, float]] = []
    for t, g in enumerate(grads, start=1):
        a = [_f32(_f32(g[i]) + err[i]) for i in range(d)]
        selected: dict[int, float] = {}
        for row in range(0, d, cols):
            for start in range(row, row + cols, block_len):
                idx = list(range(start, min(start + block_len, row + cols)))
                for i in sorted(idx, key=lambda i: -abs(a[i]))[: topk_count(len(idx), density)]:
                    selected[i] = _bf16(a[i])
                    a[i] = 0.0
        ring = (ring + [selected])[-window:]
        for row in range(0, d if feedback else 0, cols):  # without feedback err stays 0
            for start in range(row, row + cols, bucket):
                chunk = a[start : min(start + bucket, row + cols)]
                lo, hi = _bf16(min(chunk)), _bf16(max(chunk))
                scale = _f32((hi - lo) / 15)
                for i, x in enumerate(chunk):
                    code = 0 if scale == 0 else min(15, max(0, math.floor(_f32(_f32(x - lo) / scale) + 0.5)))
                    err[start + i] = _f32(lo + _f32(code * scale))
        c1, c2 = (1 - beta1) / (1 - beta1**t), (1 - beta2) / (1 - beta2**t)
        for i in range(d):
            p[i] *= 1 - lr * wd
            m_sum = sum(beta1**age * sel.get(i, 0.0) for age, sel in enumerate(reversed(ring)))
            s_sum = sum(beta2**age * sel.get(i, 0.0) ** 2 for age, sel in enumerate(reversed(ring)))
            if m_sum or s_sum:
                p[i] -= lr * c1 * m_sum / (math.sqrt(c2 * s_sum) + eps)
    return p


@pytest.mark.parametrize("feedback", [True, False])
def test_reference_matches_a_coordinate_loop(feedback):
    """The vectorised reference equals a per-coordinate loop over 12 steps (window 4 wraps around),
    with and without error feedback.

    3 rows of 70: per row 3 blocks (24, 24, 22) and 9 buckets (the last of 6).
    """
    shape = (3, 70)
    settings = dict(window=4, density=0.1, block=32, bucket=8, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.1)
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(12)]
    want = _naive_micro_adam(p0.view(-1).tolist(), [g.view(-1).tolist() for g in grads], cols=70, **settings,
                             feedback=feedback)

    param = nn.Parameter(p0.clone())
    opt = MicroAdam([param], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, window=4, density=0.1,
                    block_size=32, quant_bucket=8, min_compressed_numel=1, backend="torch", error_feedback=feedback)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach().double().view(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_updated_independently(dtype):
    """A 5 x 37 tensor steps exactly like its 5 rows as separate 1 x 37 tensors: nothing crosses a row, which
    is what lets every rank of FSDP2 update its own rows alone (3 blocks of <= 13 and 5 buckets per row)."""
    settings = dict(lr=0.01, weight_decay=0.1, window=3, density=0.1, block_size=16, quant_bucket=8,
                    min_compressed_numel=1, backend="torch")
    whole = _param(5, 37, dtype=dtype)
    rows = [nn.Parameter(whole.detach()[r : r + 1].clone()) for r in range(5)]
    opt_whole, opt_rows = MicroAdam([whole], **settings), MicroAdam(rows, **settings)
    for step in range(6):
        grad = _param(5, 37, dtype=dtype, seed=step + 1).detach()
        whole.grad = grad.clone()
        for r, p in enumerate(rows):
            p.grad = grad[r : r + 1].clone()
        opt_whole.step()
        opt_rows.step()
    assert torch.equal(whole.detach(), torch.cat([p.detach() for p in rows]))
    for key in ("window", "error", "error_min", "error_max"):
        assert torch.equal(opt_whole.state[whole][key], torch.cat([opt_rows.state[p][key] for p in rows])), key


def test_error_feedback_tracks_the_sum_of_gradients():
    """Each step conserves g_t + deq(e_{t-1}) = V_t + deq(e_t) up to that step's quantisation bound, so
    sum_t V_t + deq(e_T) tracks sum_t g_t within the sum of the bounds.

    A step's bound, per coordinate: half a quantisation step of its bucket, (max - min) / 30, plus the
    bf16 rounding (<= 2**-9 relative, 2**-8 here) of the bucket's min/max and of a selected value.
    """
    rows, cols, steps = 2, 4097, 40  # per row: 5 blocks (4 of 820, 817), 65 buckets (the last of 1)
    layout = micro_adam_layout(rows, cols, block_size=1024, density=0.01, quant_bucket=64)
    param = torch.zeros(rows, cols)
    window, error, lo, hi = state = init_state(param, layout, window=4)
    offsets = block_offsets(layout, param.device)
    gen = torch.Generator().manual_seed(0)
    grad_sum, applied, total_bound = (torch.zeros(rows, cols, dtype=torch.float64) for _ in range(3))
    for t in range(1, steps + 1):
        grad = torch.randn(rows, cols, generator=gen) * (1 + torch.arange(cols) % 7)
        before = dequantize_4bit(error, lo, hi, cols, 64).double()
        micro_adam_update_(param, grad, *state, float(t), layout=layout, lr=0.0, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.0)
        indices, values = unpack_window_entries(window[:, (t - 1) % 4])
        selected = torch.zeros(rows, cols, dtype=torch.float64).scatter_add_(1, indices.long() + offsets, values.double())
        after = dequantize_4bit(error, lo, hi, cols, 64).double()
        half_step = (hi.double() - lo.double()) / 30
        rounding = torch.maximum(lo.double().abs(), hi.double().abs()) * 2**-8
        bound = (half_step + rounding).repeat_interleave(64, dim=1)[:, :cols] + selected.abs() * 2**-8 + 1e-6
        assert bool(((selected + after - grad.double() - before).abs() <= bound).all()), t
        grad_sum += grad.double()
        applied += selected
        total_bound += bound
    gap = (applied + dequantize_4bit(error, lo, hi, cols, 64).double() - grad_sum).abs()
    assert bool((gap <= total_bound).all())
    assert bool((applied != 0).sum() > 0.2 * rows * cols)  # many coordinates were applied, not a trivial pass


def test_error_feedback_carries_what_top_k_dropped_into_the_next_selection():
    """One block of 4, k = 1. Step 1 keeps coordinate 0 and drops 0.9 at coordinate 1. At step 2 the
    gradient favours coordinate 0 again (1 against 0.2), but with error feedback coordinate 1 holds
    0.2 + 0.9 and is selected, so it moves; without error feedback it never moves, and coordinate 0
    gets a second full entry in the window (a larger step)."""
    grads = [torch.tensor([[1.0, 0.9, 0.0, 0.0]]), torch.tensor([[1.0, 0.2, 0.0, 0.0]])]
    end, errors = {}, {}
    for feedback in (True, False):
        param = nn.Parameter(torch.zeros(1, 4))
        opt = MicroAdam([param], lr=0.1, window=4, density=0.25, block_size=4, quant_bucket=4,
                        min_compressed_numel=1, backend="torch", error_feedback=feedback)
        for g in grads:
            param.grad = g.clone()
            opt.step()
        end[feedback] = param.detach()[0].tolist()
        state = opt.state[param]
        errors[feedback] = (dequantize_4bit(state["error"], state["error_min"], state["error_max"], 4, 4)
                            if feedback else None)
    assert end[True][1] < 0.0 and end[False][1] == 0.0
    assert end[False][0] < end[True][0] < 0.0
    assert end[False][0] == pytest.approx(-0.2, abs=1e-6)  # two entries of 1: AdamW's u = 1 twice
    # what is left after step 2: coordinate 0's gradient 1 (coordinate 1 was applied in full)
    torch.testing.assert_close(errors[True], torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_without_error_feedback_no_error_state_is_allocated():
    """768 x 3072 (48 buckets of 64 per row): the state is the window alone, 0.404 bytes/param instead
    of 0.966; the difference is the packed codes and the bf16 min/max."""
    param = nn.Parameter(torch.zeros(768, 3072))
    with_ef = MicroAdam([param], backend="torch")
    without = MicroAdam([param], backend="torch", error_feedback=False)
    assert with_ef.state_bytes() - without.state_bytes() == 768 * (3072 // 2 + 2 * 2 * 48)
    param.grad = torch.randn(768, 3072)
    without.step()
    state = without.state[param]
    assert {k: v.dtype for k, v in state.items()} == {"step": torch.float32, "window": torch.int32}
    allocated = sum(v.numel() * v.element_size() for v in state.values())
    assert allocated == without.state_bytes()
    assert (allocated - 4) / param.numel() == pytest.approx(0.40365, abs=1e-5)


def test_the_error_state_is_all_or_nothing():
    layout = micro_adam_layout(2, 100)
    param = torch.zeros(2, 100)
    window, error, lo, hi = init_state(param, layout, 3)
    with pytest.raises(ValueError, match=r"error state is incomplete: \['error_min'\] missing"):
        micro_adam_update_(param, torch.ones(2, 100), window, error, None, hi, 1.0, layout=layout, lr=0.1,
                           beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


# ---- edge cases ----------------------------------------------------------------------------------


def test_quantisation_of_a_known_vector_is_exact_and_packs_low_nibble_first():
    """Values on the 4-bit grid of their bucket come back exactly; column 2i is the low nibble of byte i."""
    codes = torch.tensor([3, 0, 15, 7, 1, 14, 8, 2])
    lo, hi = -1.5, 3.0  # bf16-exact; step (hi - lo) / 15 = 0.3
    x = (lo + codes * ((hi - lo) / 15)).view(1, 8)
    packed, got_lo, got_hi = quantize_4bit(x, 8)
    assert packed.tolist() == [[3 | 0 << 4, 15 | 7 << 4, 1 | 14 << 4, 8 | 2 << 4]]
    assert (got_lo.item(), got_hi.item()) == (lo, hi)
    torch.testing.assert_close(dequantize_4bit(packed, got_lo, got_hi, 8, 8), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [1, 63, 65, 4097])
def test_quantisation_round_trip_within_half_a_step(d):
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(d)) * 3
    x[1] *= 100  # buckets are per row: one row's range does not coarsen another's
    packed, lo, hi = quantize_4bit(x, 64)
    assert (packed.dtype, lo.dtype, hi.dtype) == (torch.uint8, torch.bfloat16, torch.bfloat16)
    assert packed.shape == (3, (d + 1) // 2) and lo.shape == hi.shape == (3, -(-d // 64))
    back = dequantize_4bit(packed, lo, hi, d, 64)
    lo_e, hi_e = (v.float().repeat_interleave(64, dim=1)[:, :d] for v in (lo, hi))
    bound = (hi_e - lo_e) / 30 + torch.maximum(lo_e.abs(), hi_e.abs()) * 2**-8
    assert bool(((back - x).abs() <= bound).all())
    for r in range(3):  # each row quantised alone gives the same bytes
        alone = quantize_4bit(x[r : r + 1], 64)
        assert all(torch.equal(a[0], b[r]) for a, b in zip(alone, (packed, lo, hi)))


def test_constant_bucket_is_exact_and_finite():
    """max == min: code 0, dequantised to the min exactly; an all-zero tensor stays zero."""
    x = torch.full((2, 130), 0.375)
    packed, lo, hi = quantize_4bit(x, 64)
    assert bool((packed == 0).all()) and bool((lo == hi).all())
    assert torch.equal(dequantize_4bit(packed, lo, hi, 130, 64), x)
    zeros = quantize_4bit(torch.zeros(2, 5), 64)
    assert torch.equal(dequantize_4bit(*zeros, 5, 64), torch.zeros(2, 5))


@pytest.mark.parametrize("shape", [(1, 1), (2, 63), (3, 65), (2, 4097), (5, 3, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awkward_sizes_step_finite_before_and_after_the_window_fills(shape, dtype):
    """Rows of 1, below a bucket, odd, not a multiple of the bucket or of the block, a conv weight (rows of
    3 x 3 x 3); 5 steps of a window of 3."""
    param = _param(*shape, dtype=dtype)
    opt = MicroAdam([param], lr=1e-2, window=3, block_size=1024, min_compressed_numel=1, backend="torch")
    before = param.detach().clone()
    for step in range(5):
        param.grad = _param(*shape, dtype=dtype, seed=step + 1).detach()
        opt.step()
        assert bool(torch.isfinite(param).all())
    assert not torch.equal(param.detach(), before)
    state = opt.state[param]
    layout = micro_adam_layout(shape[0], math.prod(shape[1:]), block_size=1024)
    assert {k: tuple(v.shape) for k, v in state.items() if k != "step"} == layout.state_shapes(3)
    indices, _ = unpack_window_entries(state["window"])
    assert int(indices.max()) < layout.block_len


def test_tiny_density_keeps_one_coordinate_per_block():
    """Rows of 2 * 256 + 10 with block_size 256: 3 blocks of 174 per row, one coordinate kept in each."""
    param = nn.Parameter(torch.zeros(2, 522))
    param.grad = _param(2, 522, seed=1).detach()
    opt = MicroAdam([param], lr=1.0, eps=0.0, density=1e-9, block_size=256, min_compressed_numel=1, backend="torch")
    opt.step()
    assert [[int((row[s : s + 174] != 0).sum()) for s in (0, 174, 348)] for row in param] == [[1, 1, 1]] * 2


def test_constant_gradient_buckets_are_finite():
    """Every bucket but those holding a selected coordinate has max == min."""
    param = nn.Parameter(torch.zeros(2, 4097))
    opt = MicroAdam([param], lr=0.1, min_compressed_numel=1, backend="torch")
    for _ in range(3):
        param.grad = torch.full((2, 4097), 0.5)
        opt.step()
    assert bool(torch.isfinite(param).all())
    state = opt.state[param]
    assert bool((state["error_min"] == state["error_max"]).any())


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_zero_gradients_do_not_make_nan(eps):
    param = _param(2, 5000)
    before = param.detach().clone()
    opt = MicroAdam([param], lr=0.1, eps=eps, min_compressed_numel=1, backend="torch")
    param.grad = torch.zeros(2, 5000)
    opt.step()
    assert torch.equal(param.detach(), before)


def test_get_optimizer_state_dict_fake_step_makes_no_nan():
    """torch.distributed.checkpoint's fake step: zero grads and lr = 0 on an empty state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = nn.Sequential(nn.Linear(80, 64), nn.Linear(64, 3))
    before = copy.deepcopy(model.state_dict())
    opt = MicroAdam(model, lr=1e-3, weight_decay=0.1, backend="torch")
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved["state"]["0.weight"]) == {"step", "window", "error", "error_min", "error_max"}
    for tensor in (*model.state_dict().values(), *(v for s in opt.state.values() for v in s.values())):
        assert bool(torch.isfinite(tensor.float()).all())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# ---- small parameters, state format --------------------------------------------------------------


def test_one_dimensional_parameters_keep_adamw_state():
    """A 1-D tensor has no rows to align blocks to: AdamW state whatever its size."""
    vector, matrix = _param(5000), _param(2, 2500)
    opt = MicroAdam([vector, matrix], min_compressed_numel=1, backend="torch")
    assert opt.compressed_names() == ["group0.param1"]
    vector.grad, matrix.grad = torch.randn(5000), torch.randn(2, 2500)
    opt.step()
    assert set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[matrix]) == {"step", "window", "error", "error_min", "error_max"}


def test_small_parameters_keep_adamw_state_and_follow_adamw():
    """Below one block (4096) a parameter keeps exp_avg/exp_avg_sq and steps exactly like torch's AdamW."""
    model = nn.Linear(100, 50)  # weight 5000: compressed; bias 50: AdamW
    opt = MicroAdam(model, lr=1e-2, weight_decay=0.1, backend="torch")
    assert opt.compressed_names() == ["weight"]
    summary = opt.summary()
    assert "compressed" in summary.splitlines()[1] and "adamw" in summary.splitlines()[2]
    assert "1 x <=100" in summary.splitlines()[1]  # one block per row of 100
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
    """768 x 3072 at the defaults: 0.966 bytes/param allocated (one block of 3072 per row, 31 kept), as
    planned; GPT-2 small as a whole 0.983 <= 1.0."""
    param = nn.Parameter(torch.zeros(768, 3072))
    opt = MicroAdam([param], backend="torch")
    planned = opt.state_bytes()
    param.grad = torch.randn(768, 3072)
    opt.step()
    state = opt.state[param]
    assert {k: v.dtype for k, v in state.items()} == {
        "step": torch.float32, "window": torch.int32, "error": torch.uint8,
        "error_min": torch.bfloat16, "error_max": torch.bfloat16,
    }
    allocated = sum(v.numel() * v.element_size() for v in state.values())
    assert allocated == planned == opt.state_bytes()
    assert (allocated - 4) / param.numel() == pytest.approx(0.96615, abs=1e-5)

    shapes = [(50257, 768), (1024, 768), (768,), (768,)]  # wte (tied head), wpe, ln_f
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                   (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    gpt2 = [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    opt = MicroAdam(gpt2)
    numel = sum(p.numel() for p in gpt2)
    assert numel == 124_439_808
    assert opt.state_bytes() / numel == pytest.approx(0.9831, abs=1e-4)
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
    assert twin_opt.state[twin[0].weight]["window"].dtype == torch.int32
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
    with pytest.raises(ValueError, match=r"param group 0 has no 'window', so it was not saved by MicroAdam"):
        opt.load_state_dict(adamw.state_dict())
    groups_only = copy.deepcopy(opt.state_dict())  # MicroAdam's groups over AdamW's state
    groups_only["state"] = adamw.state_dict()["state"]
    with pytest.raises(ValueError, match=r"for '0\.weight': it has the keys \['exp_avg', 'exp_avg_sq', 'step'\].*"
                                         r"missing \['error', 'error_max'"):
        opt.load_state_dict(groups_only)

    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["window"] = saved["state"][0]["window"].long()
    with pytest.raises(ValueError, match=r"for '0\.weight': 'window' is torch\.int64, MicroAdam stores it as torch\.int32"):
        opt.load_state_dict(saved)

    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["error"] = saved["state"][0]["error"].view(-1)  # a flat (not row-aligned) layout
    with pytest.raises(ValueError, match=r"for '0\.weight': 'error' has shape \[2560\], but MicroAdam .* expects \[64, 40\]"):
        opt.load_state_dict(saved)

    other = MicroAdam(model, window=5, backend="torch")
    with pytest.raises(ValueError, match=r"saved with window=3, this MicroAdam has window=5"):
        other.load_state_dict(opt.state_dict())


def test_checkpoints_with_and_without_error_feedback_do_not_mix():
    """Each way round the error names the setting and the fix; a state dict whose groups predate the
    flag are refused; a state that lacks the error tensors is named as such."""
    model, opt = _trained(error_feedback=False)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"step", "window"}
    with_ef = MicroAdam(model, lr=1e-2, weight_decay=0.1, window=3, backend="torch")
    with pytest.raises(ValueError, match=r"param group 0 was saved with error_feedback=False, this MicroAdam has "
                                         r"error_feedback=True; .*only with error feedback, so build the optimizer "
                                         r"with error_feedback=False"):
        with_ef.load_state_dict(saved)

    _, opt_ef = _trained()
    without = MicroAdam(model, lr=1e-2, weight_decay=0.1, window=3, backend="torch", error_feedback=False)
    with pytest.raises(ValueError, match=r"saved with error_feedback=True, this MicroAdam has error_feedback=False"):
        without.load_state_dict(opt_ef.state_dict())

    foreign = copy.deepcopy(opt_ef.state_dict())  # groups without MicroAdam's settings
    for group in foreign["param_groups"]:
        del group["error_feedback"]
    with pytest.raises(ValueError, match=r"param group 0 has no 'error_feedback', so it was not saved by MicroAdam"):
        with_ef.load_state_dict(foreign)
    assert "error_feedback" in with_ef.param_groups[0]

    stripped = copy.deepcopy(opt_ef.state_dict())  # the groups say error feedback, the state has none
    for state in stripped["state"].values():
        for key in ("error", "error_min", "error_max"):
            state.pop(key, None)
    with pytest.raises(ValueError, match=r"for '0\.weight': it was saved without error feedback \(its state has no "
                                         r"\['error', 'error_min', 'error_max'\]\), but this MicroAdam has "
                                         r"error_feedback=True; build the optimizer with error_feedback=False"):
        MicroAdam(model, lr=1e-2, weight_decay=0.1, window=3, backend="torch").load_state_dict(stripped)


def test_state_dict_round_trip_without_error_feedback_continues_identically():
    model, opt = _trained(error_feedback=False)
    twin = copy.deepcopy(model)
    twin_opt = MicroAdam(twin, lr=1e-2, weight_decay=0.1, window=3, backend="torch", error_feedback=False)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    x = torch.randn(8, 80)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert set(twin_opt.state[twin[0].weight]) == {"step", "window"}


# ---- behaviour -----------------------------------------------------------------------------------


def test_maximize_and_per_group_lr():
    a, b = _param(2, 2500), _param(2, 2500)
    frozen = _param(2, 2500, seed=2)
    opt = MicroAdam([{"params": [a]}, {"params": [b], "maximize": True}, {"params": [frozen], "lr": 0.0}],
                    lr=1.0, eps=0.0, min_compressed_numel=1, backend="torch")
    start = [t.detach().clone() for t in (a, b, frozen)]
    grad = _param(2, 2500, seed=1).detach()
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


@pytest.mark.parametrize("feedback", [True, False])
def test_compile_backend_matches_the_reference(feedback):
    """Compiled (no fallback to eager allowed) equals eager on rows of two blocks (2049 and 2048), odd
    rows with a last bucket of one coordinate; the compressed state exactly. Without error feedback too
    (``None`` error state)."""
    param, twin = _param(3, 4097), _param(3, 4097)
    settings = dict(lr=1e-2, window=3, min_compressed_numel=1, error_feedback=feedback)
    eager = MicroAdam([param], **settings, backend="torch")
    compiled = MicroAdam([twin], **settings, backend="compile")
    for step in range(4):
        grad = _param(3, 4097, seed=step + 1).detach()
        param.grad, twin.grad = grad.clone(), grad.clone()
        eager.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compilation warns, then runs eagerly
            compiled.step()
    torch.testing.assert_close(twin, param, rtol=1e-5, atol=1e-6)
    assert set(compiled.state[twin]) == set(eager.state[param])
    for key in ("window", "error", "error_min", "error_max")[: 4 if feedback else 1]:
        assert torch.equal(compiled.state[twin][key], eager.state[param][key]), key


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error():
    script = textwrap.dedent(
        """
        import torch
        from lightning_lowmem import MicroAdam
        p = torch.nn.Parameter(torch.randn(2, 2500))
        p.grad = torch.randn(2, 2500)
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
