"""Momentum formats: (de)quantization error bounds, stochastic rounding, and bad values."""

from __future__ import annotations

import pytest
import torch

from lightning_lowmem.kernels.momentum_formats import (INT4_CODE_BOOK, MomentumFormat, decode, encode_, random_bits,
                                                       stochastic_round_bf16)


def _momentum(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed entries whose magnitude varies by row and by block, as momentum does."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) ** 3
    return x * torch.logspace(-4, 0, rows).unsqueeze(1) * (1 + torch.arange(cols) // 64).float()


def _round_trip(m: torch.Tensor, fmt: MomentumFormat) -> tuple[torch.Tensor, torch.Tensor]:
    state = fmt.new_state(tuple(m.shape), m.device)
    encode_(state, m, fmt)
    return decode(state, fmt, m.shape), state.scales


def _block_absmax(m: torch.Tensor, block: int) -> torch.Tensor:
    """Each entry's block absmax, blocks of ``block`` consecutive entries of one row."""
    rows, cols = m.shape
    blocks = -(-cols // block)
    padded = torch.zeros(rows, blocks * block)
    padded[:, :cols] = m.abs()
    return padded.view(rows, blocks, block).amax(2).repeat_interleave(block, dim=1)[:, :cols]


@pytest.mark.parametrize("shape", [(5, 300), (3, 7), (1, 128), (4, 129)])
@pytest.mark.parametrize("block", [32, 128])
def test_int8_error_is_at_most_half_a_step_of_its_own_block(shape, block):
    m = _momentum(*shape)
    fmt = MomentumFormat.of("int8", block)
    got, scales = _round_trip(m, fmt)
    step = _block_absmax(m, block) / 127
    assert torch.all((got - m).abs() <= step / 2 * (1 + 1e-5) + 1e-30)
    # the bound is tight enough to catch a wrong block: with the neighbouring block's scale it fails
    assert scales.shape == (shape[0], -(-shape[1] // block))
    torch.testing.assert_close(scales, _block_absmax(m, block)[:, ::block] / 127)


@pytest.mark.parametrize("shape", [(5, 300), (3, 7), (4, 129)])
def test_int4_decodes_to_the_nearest_code_book_value_of_its_block(shape):
    m = _momentum(*shape, seed=1)
    fmt = MomentumFormat.of("int4", 64)
    got, scales = _round_trip(m, fmt)
    absmax = _block_absmax(m, 64)
    book = torch.tensor(INT4_CODE_BOOK)
    nearest = book[(m / absmax).unsqueeze(-1).sub(book).abs().argmin(-1)] * absmax
    torch.testing.assert_close(got, nearest, atol=1e-7, rtol=1e-6)
    gaps = torch.tensor(INT4_CODE_BOOK).diff().max()
    assert torch.all((got - m).abs() <= absmax * gaps / 2 + 1e-7)
    assert scales.shape == (shape[0], -(-shape[1] // 64))


def test_blocks_never_span_rows():
    """Row 0 is huge, row 1 tiny: a block crossing rows would flush row 1 to zero."""
    m = torch.cat([torch.full((1, 100), 1e3), torch.linspace(-1e-3, 1e-3, 100).view(1, 100)])
    for name in ("int8", "int4"):
        got, _ = _round_trip(m, MomentumFormat.of(name, 64))
        assert (got[1] != 0).sum() > 50
        assert torch.allclose(got[1], m[1], atol=1e-3 * (0.16 if name == "int4" else 0.005))


def test_a_block_of_zeros_decodes_to_zeros():
    m = torch.zeros(2, 10)
    m[0, 3] = 0.5
    for name in ("int8", "int4"):
        got, _ = _round_trip(m, MomentumFormat.of(name, 4))
        assert torch.equal(got, m)


@pytest.mark.parametrize("fraction", [1 / 16, 0.25, 0.4, 0.75])
def test_stochastic_rounding_to_bf16_is_unbiased(fraction):
    """Many draws of a value a ``fraction`` of a bf16 step above 1.0 (and its negative): each
    rounds to one of its two neighbours and their mean is the value (round to nearest is off by
    up to half a step, 2e-3)."""
    step = 2.0**-7
    x = torch.full((100_000,), 1.0 + fraction * step)
    x[::2] *= -1
    rounded = stochastic_round_bf16(x, seed=3).float()
    assert torch.all((rounded.abs() == 1.0) | (rounded.abs() == 1.0 + step))
    for sign in (1, -1):
        part = rounded[(x * sign) > 0] * sign
        assert abs(part.mean().item() - (1.0 + fraction * step)) < 1e-4  # 6 standard errors; round to nearest: >= 4.9e-4
    assert abs(((rounded.abs() > 1.0).float().mean().item()) - fraction) < 0.01


def test_random_bits_depend_on_seed_and_index_and_are_uniform():
    idx = torch.arange(100_000)
    a, b = random_bits(1, idx), random_bits(2, idx)
    assert not torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 2**32
    low = (a & 0xFFFF).float() / 65536
    assert abs(low.mean().item() - 0.5) < 0.01 and abs(low.var().item() - 1 / 12) < 0.005


@pytest.mark.parametrize(("name", "block", "message"), [
    ("int3", 128, "Invalid exp_avg_dtype: 'int3'; choose one of 'fp32', 'bf16', 'int8', 'int4'"),
    ("int4", 33, "Invalid exp_avg_block for int4: 33 (must be even"),
    ("int8", 1, "Invalid exp_avg_block: 1 (must be an integer >= 2)"),
    ("int8", 64.0, "Invalid exp_avg_block: 64.0 (must be an integer >= 2)"),
])
def test_bad_formats_are_refused(name, block, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MomentumFormat.of(name, block)


def test_state_bytes_count_codes_and_scales():
    assert MomentumFormat.of("int8", 128).state_bytes((768, 3072)) == 768 * 3072 + 4 * 768 * 24
    assert MomentumFormat.of("int4", 128).state_bytes((768, 3071)) == 768 * 1536 + 4 * 768 * 24
    assert MomentumFormat.of("bf16").state_bytes((10, 3)) == 60
