"""MicroAdam's Triton kernels against the PyTorch reference (Triton's interpreter on a CPU machine).

Without CUDA the kernels run in Triton's interpreter, which ``tests/conftest.py`` switches on before
anything imports ``triton``; on a GPU they run natively. Shapes are small and awkward (rows of 1, 63,
65, 4097: below a bucket, odd, not a multiple of the bucket, a row of several blocks; several rows, so
that a kernel mixing up rows fails) because the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from lightning_lowmem.kernels import micro_adam_triton as kernels  # noqa: E402
from lightning_lowmem.kernels import resolve  # noqa: E402
from lightning_lowmem.kernels.micro_adam import micro_adam_update_, micro_adam_update_compiled_  # noqa: E402
from lightning_lowmem.kernels.micro_adam_error_feedback import dequantize_add, quantize_4bit, quantize_into_  # noqa: E402
from lightning_lowmem.kernels.micro_adam_layout import init_state, micro_adam_layout  # noqa: E402
from lightning_lowmem.kernels.micro_adam_packing import pack_window_entries  # noqa: E402
from lightning_lowmem.kernels.micro_adam_triton import micro_adam_update_triton_  # noqa: E402
from lightning_lowmem.kernels.micro_adam_window import (  # noqa: E402
    apply_window_update_,
    bias_factors,
    window_ages,
    window_weights,
)


def test_kernels_run_natively_or_in_the_interpreter():
    """On a CPU machine the interpreter must be on, else every kernel test below would crash."""
    assert torch.cuda.is_available() or isinstance(triton.language.max, InterpretedFunction)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(1, 1), (3, 63), (2, 65), (2, 4097)]
DTYPES = [torch.float32, torch.bfloat16]
#: fp32: a few ulp (the kernels may fuse a multiply-add on a GPU); bf16 parameters: one bf16 ulp.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def _layout(shape: tuple[int, int]):
    return micro_adam_layout(*shape, block_size=1024, density=0.02, quant_bucket=64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_add_matches_the_reference(shape, dtype):
    layout = _layout(shape)
    error, lo, hi = quantize_4bit(_randn(*shape, seed=shape[1]) * 2, 64)
    grad = _randn(*shape, seed=shape[1] + 1, dtype=dtype)
    want = dequantize_add(grad, error, lo, hi, layout)
    got = kernels.dequantize_add(grad, error, lo, hi, layout)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_the_reference(shape):
    """Same bf16 min/max (round to nearest even) and the same codes, with constant buckets included."""
    layout = _layout(shape)
    x = _randn(*shape, seed=shape[1]) * 3
    x[0, 64:128] = 0.25  # a bucket with max == min (when the row reaches it)
    x[-1] *= 50  # rows have their own buckets
    want = init_state(x, layout, 1)[1:]  # error, error_min, error_max
    got = init_state(x, layout, 1)[1:]
    quantize_into_(x, *want, layout)
    kernels.quantize_into_(x, *got, layout)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    codes = [torch.stack((e & 15, e >> 4), 2).view(shape[0], -1)[:, : shape[1]].int() for e in (want[0], got[0])]
    assert int((codes[0] - codes[1]).abs().max()) <= 1  # a division on the knife edge of a rounding
    assert float((codes[0] == codes[1]).float().mean()) >= 0.999


def _random_window(layout, window: int, written: int, seed: int) -> torch.Tensor:
    """Packed ring slots with distinct indices per block, slot and row, drawn from few values so slots overlap."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.zeros(layout.rows, window, layout.topk_per_row, dtype=torch.int64)
    values = torch.zeros(layout.rows, window, layout.topk_per_row)
    tail = layout.cols % layout.block_len
    for row in range(layout.rows):
        for slot in range(written):
            cols = []
            for b in range(layout.blocks_per_row):
                size, k = (layout.block_len, layout.k) if b < layout.full_blocks else (tail, layout.k_last)
                pool = min(size, 3 * k)  # few candidates: the same coordinate recurs across slots
                cols.append(torch.randperm(pool, generator=gen)[:k])
            indices[row, slot] = torch.cat(cols)
            values[row, slot] = torch.randn(layout.topk_per_row, generator=gen)
    return pack_window_entries(indices, values).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("step", "eps"), [(2, 1e-8), (7, 0.0)])
def test_window_update_matches_the_reference(shape, dtype, step, eps):
    """Window of 4, half written (step 2) or wrapped around (step 7), shared coordinates across slots."""
    layout, window = _layout(shape), 4
    entries = _random_window(layout, window, min(step, window), seed=shape[1] + step)
    ages = window_ages(float(step), window, DEVICE)
    w1, w2 = window_weights(ages, 0.9, 0.999)
    c1, c2 = bias_factors(float(step), 0.9, 0.999)
    want = _randn(*shape, seed=shape[1], dtype=dtype)
    got = want.clone()
    apply_window_update_(want, entries, ages, w1, w2, c1, c2, eps, 0.1, layout)
    kernels.apply_window_update_(got, entries, ages, w1, w2, c1, c2, eps, 0.1, layout)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    changed = got != _randn(*shape, seed=shape[1], dtype=dtype)
    assert int(changed.sum()) > 0
    assert bool(changed.any(dim=1).all())  # every row was updated (by its own programs)


@pytest.mark.parametrize("shape", [(3, 63), (2, 4097), (4, 3, 3, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_update_matches_the_reference_over_steps(shape, dtype):
    """Five steps of a window of 3 (fills, then wraps): parameters and every state tensor agree."""
    layout = _layout((shape[0], math.prod(shape[1:])))
    param_ref = _randn(*shape, seed=0, dtype=dtype)
    param_tri = param_ref.clone()
    state_ref, state_tri = init_state(param_ref, layout, 3), init_state(param_tri, layout, 3)
    hparams = dict(layout=layout, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for step in range(1, 6):
        grad = _randn(*shape, seed=step, dtype=dtype)
        micro_adam_update_(param_ref, grad, *state_ref, float(step), **hparams)
        micro_adam_update_triton_(param_tri, grad, *state_tri, float(step), **hparams)
    torch.testing.assert_close(param_tri, param_ref, **TOLERANCE[dtype])
    for got, want in zip(state_tri, state_ref):
        assert got.dtype == want.dtype
        assert float((got == want).float().mean()) >= 0.99  # exact but for knife-edge roundings


@pytest.mark.parametrize("shape", [(3, 63), (2, 4097)])
def test_update_without_error_feedback_matches_the_reference(shape):
    """No error state (``None``): both take the top-k of the gradient itself, over a window that wraps."""
    layout = _layout(shape)
    param_ref = _randn(*shape, seed=0)
    param_tri = param_ref.clone()
    window_ref, *errors = init_state(param_ref, layout, 3, error_feedback=False)
    window_tri = window_ref.clone()
    assert errors == [None, None, None]
    hparams = dict(layout=layout, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for step in range(1, 6):
        grad = _randn(*shape, seed=step)
        micro_adam_update_(param_ref, grad, window_ref, None, None, None, float(step), **hparams)
        micro_adam_update_triton_(param_tri, grad, window_tri, None, None, None, float(step), **hparams)
    torch.testing.assert_close(param_tri, param_ref, **TOLERANCE[torch.float32])
    assert torch.equal(window_tri, window_ref)
    assert not torch.equal(param_ref, _randn(*shape, seed=0))


def test_zero_gradient_first_step_is_finite():
    """get_optimizer_state_dict's fake step: zero gradient, lr = 0, eps = 0."""
    layout = _layout((2, 4097))
    param = _randn(2, 4097, seed=0)
    before = param.clone()
    state = init_state(param, layout, 3)
    micro_adam_update_triton_(param, torch.zeros_like(param), *state, 1.0, layout=layout, lr=0.0, beta1=0.9,
                              beta2=0.999, eps=0.0, weight_decay=0.1)
    assert torch.equal(param, before)


def test_resolve_picks_triton_for_cuda_and_the_compiled_reference_elsewhere():
    assert resolve("micro_adam", "auto", "cuda") is micro_adam_update_triton_
    assert resolve("micro_adam", "torch", "cuda") is micro_adam_update_
    assert resolve("micro_adam", "triton", "cpu") is micro_adam_update_triton_  # explicit: the interpreter
    assert resolve("micro_adam", "auto", "cpu") is micro_adam_update_compiled_
    assert resolve("micro_adam", "native", "cpu") is micro_adam_update_compiled_  # no C kernel for MicroAdam
    with pytest.raises(ValueError, match="Invalid backend 'cuda'"):
        resolve("micro_adam", "cuda", "cpu")
    with pytest.raises(ValueError, match="Unknown op 'adam'"):
        resolve("adam", "auto", "cpu")


def test_optimizer_with_triton_backend_follows_the_reference_on_every_parameter():
    """Compressed weights and the small AdamW-state bias both take the Triton path and match eager."""
    from lightning_lowmem.optim import MicroAdam

    torch.manual_seed(0)
    models = [torch.nn.Linear(40, 6) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [MicroAdam(m.parameters(), lr=1e-2, block_size=16, quant_bucket=8, min_compressed_numel=64,
                            backend=backend) for m, backend in zip(models, ("torch", "triton"))]
    assert optimizers[1].is_compressed(models[1].weight, optimizers[1].param_groups[0])
    assert not optimizers[1].is_compressed(models[1].bias, optimizers[1].param_groups[0])
    for _ in range(4):
        x = torch.randn(5, 40)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
