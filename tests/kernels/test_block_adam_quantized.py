"""The ``block_adam_quantized`` op: the C kernel and the Triton kernel (interpreter) against the
PyTorch reference on awkward shapes (tests/kernels/_cases.py), for every momentum format."""

from __future__ import annotations

import pytest
import torch

import lightning_lowmem.kernels.block_adam_quantized_native as native_q
from lightning_lowmem.kernels import resolve
from lightning_lowmem.kernels.block_adam import adam_step_scalars, block_mean_sq
from lightning_lowmem.kernels.block_adam_quantized import block_adam_quantized_multi_update_
from lightning_lowmem.kernels.momentum_formats import INT4_CODE_BOOK, INT4_MIDPOINTS, MomentumFormat, decode
from lightning_lowmem.optim.placement import layout_for
from lightning_lowmem.partition import BlockSpec, ParamBlocks
from _cases import DEVICE, ENTRIES, HPARAMS, TOL, make_tensors  # tests/kernels/_cases.py

FORMATS = [MomentumFormat.of("int8", 128), MomentumFormat.of("int8", 5), MomentumFormat.of("int4", 64),
           MomentumFormat.of("int4", 6), MomentumFormat.of("bf16")]
SHAPES = [name for name in sorted(ENTRIES) if len(ENTRIES[name].shape) >= 2]


def _run(update, entry, fmt, dtype=torch.float32, *, maximize=False, reduced_means=False, rounding=False):
    (p, m, v), grads = make_tensors(entry, dtype)
    if not fmt.applies_to(p):
        pytest.skip("int8/int4 keep fp32 momentum for tensors of fewer than 2 dims")
    layout = layout_for(entry, torch.device(DEVICE))
    state = fmt.new_state(tuple(p.shape), p.device)
    for t, g in enumerate(grads, start=1):
        step_size, bc2 = adam_step_scalars(t, HPARAMS["lr"], HPARAMS["beta1"], HPARAMS["beta2"])
        mean_sq = block_mean_sq(g, layout) if reduced_means and not layout.elementwise else None
        update([p], [g], [state], [v], [layout], [mean_sq], [fmt], [1000 + t], stochastic_rounding=rounding,
               step_size=step_size, bias_correction2_sqrt=bc2, maximize=maximize, **HPARAMS)
    return p, decode(state, fmt, p.shape), v, state


def _assert_matches(got, expected, fmt, dtype=torch.float32):
    (p, m, v, state), (p_ref, m_ref, v_ref, state_ref) = got, expected
    assert state.codes.dtype == state_ref.codes.dtype == fmt.dtype
    torch.testing.assert_close(v, v_ref, **TOL[torch.float32])
    if fmt.quantized:
        # an int code one step off (a rounding boundary) moves the next steps' update by a fraction
        # of lr / 127; everywhere else the parameters agree to fp32 rounding
        close = torch.isclose(p.float(), p_ref.float(), **TOL[dtype])
        assert close.float().mean() > 0.99 and (p.float() - p_ref.float()).abs().max() <= HPARAMS["lr"] / 50
    else:
        torch.testing.assert_close(p.float(), p_ref.float(), **TOL[dtype])
    if fmt.quantized:
        torch.testing.assert_close(state.scales, state_ref.scales, atol=1e-9, rtol=1e-5)
        # codes may differ by one where fp32 arithmetic lands on a rounding boundary; not elsewhere
        step = state_ref.scales.max() * (0.3 if fmt.name == "int4" else 1.0)
        assert (m - m_ref).abs().max() <= step * 1.001
        assert (~torch.isclose(m, m_ref, atol=1e-12, rtol=1e-5)).float().mean() < 0.01
    else:
        torch.testing.assert_close(m, m_ref, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}_{f.block}")
@pytest.mark.parametrize("name", SHAPES)
def test_native_equals_reference(name, fmt):
    if not native_q.quantized_kernel_build().library:
        pytest.skip(f"the C kernel cannot be built here: {native_q.quantized_kernel_build().problem}")
    native = resolve("block_adam_quantized", "native", "cpu")
    entry = ENTRIES[name]
    expected = _run(block_adam_quantized_multi_update_, entry, fmt)
    _assert_matches(_run(native, entry, fmt), expected, fmt)
    for kwargs in (dict(maximize=True), dict(reduced_means=True)):
        _assert_matches(_run(native, entry, fmt, **kwargs), _run(block_adam_quantized_multi_update_, entry, fmt, **kwargs), fmt)


def test_native_hands_bf16_parameters_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(native_q, "_run", lambda *a: calls.append(a))
    native = resolve("block_adam_quantized", "native", "cpu")
    fmt, entry = MomentumFormat.of("int8"), ENTRIES["row_123x431"]
    got = _run(native, entry, fmt, torch.bfloat16, rounding=True)
    assert not calls
    _assert_matches(got, _run(block_adam_quantized_multi_update_, entry, fmt, torch.bfloat16, rounding=True), fmt,
                    torch.bfloat16)


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[3], FORMATS[4]], ids=lambda f: f"{f.name}_{f.block}")
@pytest.mark.parametrize("name", ["head_of_3_rows", "fused_qkv", "transposed_heads", "full_6x42", "row_1x1"])
def test_triton_equals_reference(name, fmt):
    pytest.importorskip("triton")
    from lightning_lowmem.kernels.block_adam_quantized_triton import block_adam_quantized_triton_

    entry = ENTRIES[name]
    _assert_matches(_run(block_adam_quantized_triton_, entry, fmt), _run(block_adam_quantized_multi_update_, entry, fmt), fmt)
    kwargs = dict(maximize=True, reduced_means=True)
    _assert_matches(_run(block_adam_quantized_triton_, entry, fmt, **kwargs),
                    _run(block_adam_quantized_multi_update_, entry, fmt, **kwargs), fmt)


@pytest.mark.parametrize("fmt", [MomentumFormat("fp32"), FORMATS[4]], ids=["fp32", "bf16"])
def test_triton_rounds_bf16_parameters_as_the_reference(fmt):
    """The same random bits: bf16 parameters and momentum round as in the reference (but where an
    fp32 value one ulp apart lands on the other side of a random threshold: rare)."""
    pytest.importorskip("triton")
    from lightning_lowmem.kernels.block_adam_quantized_triton import block_adam_quantized_triton_

    entry = ENTRIES["row_wide_3x2500"]
    got = _run(block_adam_quantized_triton_, entry, fmt, torch.bfloat16, rounding=True)
    expected = _run(block_adam_quantized_multi_update_, entry, fmt, torch.bfloat16, rounding=True)
    assert got[0].dtype == torch.bfloat16
    assert (got[0] != expected[0]).float().mean() < 1e-3
    torch.testing.assert_close(got[1], expected[1], atol=1e-9, rtol=1e-5 if fmt.name == "fp32" else 0)
    if fmt.name == "bf16":
        assert (got[1] != expected[1]).float().mean() < 1e-3


def test_stochastic_rounding_keeps_updates_below_half_a_bf16_step():
    """A bf16 parameter at 1.0 moved by 1e-4 per step (1/78 of a bf16 step): round to nearest never
    moves it; stochastic rounding moves it by the sum of the updates on average."""
    n, steps = 4096, 200
    layout = layout_for(ENTRIES["full_6x42"], torch.device("cpu"))
    results = {}
    for rounding in (False, True):
        p = torch.ones(n, 1, dtype=torch.bfloat16)
        m, v = MomentumFormat("fp32").new_state((n, 1), "cpu"), torch.ones(n, 1)
        for t in range(steps):
            block_adam_quantized_multi_update_(
                [p], [torch.ones(n, 1, dtype=torch.bfloat16)], [m], [v], [layout], [None], [MomentumFormat("fp32")],
                [t], stochastic_rounding=rounding, lr=0.0, step_size=1e-4, bias_correction2_sqrt=1.0, beta1=0.0,
                beta2=1.0 - 1e-12, eps=0.0, weight_decay=0.0, maximize=False)
        results[rounding] = p.float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - (1.0 - steps * 1e-4)) < 2e-3


EXACT_ENTRIES = {**{name: ENTRIES[name] for name in ("row_wide_3x2500", "full_6x42", "transposed_heads", "fused_qkv")},
                 "row_odd_9x1001": ParamBlocks.single("w", (9, 1001), BlockSpec("row"))}
EXACT_FORMATS = [MomentumFormat.of("int4", 128), MomentumFormat.of("int4", 6), MomentumFormat.of("int4", 38),
                 MomentumFormat.of("int8", 128), MomentumFormat.of("int8", 37)]


def _one_step(update, p, g, state, v, entry, fmt, beta1, lr):
    layout = layout_for(entry, torch.device("cpu"))
    update([p], [g], [state], [v], [layout], [None], [fmt], [7], stochastic_rounding=False, lr=lr, step_size=lr,
           bias_correction2_sqrt=0.5, beta1=beta1, beta2=0.99, eps=1e-4, weight_decay=0.0, maximize=False)


def _needs_kernel():
    if not native_q.quantized_kernel_build().library:
        pytest.skip(f"the C kernel cannot be built here: {native_q.quantized_kernel_build().problem}")


@pytest.mark.parametrize("fmt", EXACT_FORMATS, ids=lambda f: f"{f.name}_{f.block}")
@pytest.mark.parametrize("name", sorted(EXACT_ENTRIES))
def test_native_encodes_exactly_as_the_reference(name, fmt):
    _needs_kernel()
    _check_encode(name, fmt)


@pytest.mark.parametrize("fmt", EXACT_FORMATS, ids=lambda f: f"{f.name}_{f.block}")
@pytest.mark.parametrize("name", sorted(EXACT_ENTRIES))
def test_native_decodes_exactly_as_the_reference(name, fmt):
    _needs_kernel()
    _check_decode(name, fmt)


@pytest.fixture
def portable_build(monkeypatch, tmp_path):
    """The C kernel built with the portable flag set only (no -march=native: no AVX-512 intrinsics)."""
    import lightning_lowmem.kernels.native as native

    def clear():
        for fn in (native.build_library, native_q.quantized_kernel_build, native_q._kernel):
            fn.cache_clear()

    monkeypatch.setattr(native, "FLAG_SETS", native.FLAG_SETS[1:])
    assert "-march=native" not in native.FLAG_SETS[0]
    monkeypatch.setenv("LIGHTNING_LOWMEM_CACHE", str(tmp_path))
    clear()
    yield tmp_path
    monkeypatch.undo()
    clear()


@pytest.mark.parametrize("fmt", [EXACT_FORMATS[0], EXACT_FORMATS[4]], ids=lambda f: f"{f.name}_{f.block}")
def test_portable_build_encodes_and_decodes_exactly_as_the_reference(portable_build, fmt):
    """The plain C loops (CPUs without AVX-512, and every block's tail) give the same codes."""
    _needs_kernel()
    assert native_q.quantized_kernel_build().path.parent == portable_build / "kernels"  # this build, not the cached one
    _check_encode("row_odd_9x1001", fmt)
    _check_decode("row_odd_9x1001", fmt)


def _check_encode(name, fmt):
    """beta1 = 0 from a zero momentum: both sides encode m = g exactly, so codes and scales must be
    EQUAL, on values that sit on the int4 midpoints and code-book values (ties), -0.0, and random ones,
    each block holding a +-1 (its absmax: m / absmax is then m itself)."""
    entry = EXACT_ENTRIES[name]
    gen = torch.Generator().manual_seed(3)
    special = torch.tensor(INT4_MIDPOINTS + INT4_CODE_BOOK + (-0.0, 0.5, -0.5))
    rows = torch.where(torch.rand(entry.shape, generator=gen) < 0.5,
                       special[torch.randint(len(special), entry.shape, generator=gen)],
                       torch.rand(entry.shape, generator=gen) * 2 - 1).view(entry.shape[0], -1)
    rows[:, :: fmt.block] = torch.where(torch.rand(rows[:, :: fmt.block].shape, generator=gen) < 0.5, 1.0, -1.0)
    g = rows.view(entry.shape).contiguous()
    results = []
    for update in (resolve("block_adam_quantized", "native", "cpu"), block_adam_quantized_multi_update_):
        (p, _, v), _ = make_tensors(entry, torch.float32)
        state = fmt.new_state(tuple(p.shape), p.device)
        _one_step(update, p, g, state, v, entry, fmt, beta1=0.0, lr=1e-3)
        results.append((state, p))
    (state, p), (state_ref, p_ref) = results
    assert torch.equal(state.scales, state_ref.scales)
    assert torch.equal(state.codes, state_ref.codes)
    torch.testing.assert_close(p, p_ref, atol=1e-7, rtol=1e-6)


def _check_decode(name, fmt):
    """beta1 = 1 keeps m as decoded: from random codes and scales, p moves by s * decode(m) (to fp32
    rounding of the update, where a misread code moves it by a code step), and re-encoding the decoded
    m (each block headed by a code of +-1, so that its scale and codes stay) gives the same codes and
    scales on both sides."""
    entry = EXACT_ENTRIES[name]
    gen = torch.Generator().manual_seed(5)
    start = fmt.new_state(entry.shape, "cpu")
    if fmt.name == "int4":
        start.codes.copy_(torch.randint(0, 15, start.codes.shape, generator=gen)
                          | torch.randint(0, 15, start.codes.shape, generator=gen) << 4)
        start.codes[:, :: fmt.block // 2] = 0x0E  # code 14 (+1) heads each block: absmax stays the scale
    else:
        start.codes.copy_(torch.randint(-127, 128, start.codes.shape, generator=gen))
        start.codes.view(entry.shape[0], -1)[:, :: fmt.block] = -127
    start.scales.copy_(torch.rand(start.scales.shape, generator=gen) + 0.5)
    results = []
    for update in (resolve("block_adam_quantized", "native", "cpu"), block_adam_quantized_multi_update_):
        (p, _, v), grads = make_tensors(entry, torch.float32)
        p.zero_()
        state = type(start)(start.codes.clone(), start.scales.clone())
        _one_step(update, p, grads[0], state, v, entry, fmt, beta1=1.0, lr=1.0)
        results.append((state, p))
    (state, p), (state_ref, p_ref) = results
    torch.testing.assert_close(p, p_ref, atol=0, rtol=1e-6)
    assert p.abs().amax() > 0
    assert torch.equal(state.scales, state_ref.scales) and torch.equal(state.codes, state_ref.codes)


def test_int4_code_book_is_symmetric_as_the_kernel_assumes():
    book, mids = native_q._code_book()
    assert torch.equal(mids, -mids.flip(0)) and torch.equal(book[:15], -book[:15].flip(0)) and book[15] == 0


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager must fail the test
@pytest.mark.parametrize("fmt, dtype", [(FORMATS[1], torch.float32), (FORMATS[3], torch.float32),
                                        (FORMATS[3], torch.bfloat16), (FORMATS[4], torch.bfloat16)],
                         ids=["int8_fp32", "int4_fp32", "int4_bf16_params", "bf16_bf16_params"])
def test_compile_equals_reference_in_one_graph(fmt, dtype):
    """backend="compile" runs the reference under torch.compile (not eagerly): the same codes and
    the same random bits (bf16 parameters and momentum with stochastic rounding), and its 3 steps, each
    with a new step size and seed, share one graph."""
    from lightning_lowmem.kernels.block_adam_quantized import block_adam_quantized_compiled_

    update = resolve("block_adam_quantized", "compile", "cpu")
    assert update is block_adam_quantized_compiled_
    entry, rounding = ENTRIES["fused_qkv"], dtype == torch.bfloat16
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = _run(update, entry, fmt, dtype, rounding=rounding)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 1
    expected = _run(block_adam_quantized_multi_update_, entry, fmt, dtype, rounding=rounding)
    _assert_matches(got, expected, fmt, dtype)
    assert torch.equal(got[3].codes, expected[3].codes)
    if rounding:
        assert torch.equal(got[0], expected[0])


def _backend_update(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from lightning_lowmem.kernels.block_adam_quantized_triton import block_adam_quantized_triton_

        return block_adam_quantized_triton_
    if backend == "native":
        _needs_kernel()
    return resolve("block_adam_quantized", backend, DEVICE)


@pytest.mark.parametrize("backend", ["torch", "compile", "native", "triton"])
@pytest.mark.parametrize("fmt, dtype", [(MomentumFormat.of("bf16"), torch.float32),
                                        (MomentumFormat.of("bf16"), torch.bfloat16),
                                        (MomentumFormat("fp32"), torch.bfloat16)],
                         ids=["bf16_momentum", "bf16_momentum_bf16_params", "bf16_params"])
def test_halves_with_index_bases_round_as_the_whole_tensor(backend, fmt, dtype):
    """A tensor updated as two dim-0 halves (the FSDP2 shards of two ranks), the second with
    ``index_bases`` = the flat index of its first entry, draws the random bits of the whole tensor
    updated at once: bit-identical bf16 momentum and parameters after every step. With base 0 for
    both halves (local indices) it does not."""
    update = _backend_update(backend)
    rows, cols = 11, 301
    entry = ParamBlocks.single("w", (rows, cols), BlockSpec("row"))
    half = 6  # torch.chunk's split of 11 rows; 6 * 301 is not a multiple of 16 (no Triton divisibility hint)
    splits = {"whole": [(slice(None), 0)], "global": [(slice(0, half), 0), (slice(half, None), half * cols)],
              "local": [(slice(0, half), 0), (slice(half, None), 0)]}
    runs = {}
    for name, parts in splits.items():
        (p, _, v), grads = make_tensors(entry, dtype)
        state = fmt.new_state(tuple(p.shape), p.device)
        for t, g in enumerate(grads, start=1):
            step_size, bc2 = adam_step_scalars(t, HPARAMS["lr"], HPARAMS["beta1"], HPARAMS["beta2"])
            for part, base in parts:
                layout = layout_for(entry, torch.device(DEVICE), rows=part)
                update([p[part]], [g[part]], [type(state)(state.codes[part])], [v[part]], [layout], [None], [fmt],
                       [1000 + t], stochastic_rounding=True, index_bases=[base], step_size=step_size,
                       bias_correction2_sqrt=bc2, maximize=False, **HPARAMS)
        runs[name] = (p, state.codes)
    (p, codes), (p_split, codes_split), (p_local, codes_local) = runs.values()
    assert p.dtype == dtype and codes.dtype == fmt.dtype
    assert torch.equal(p, p_split) and torch.equal(codes, codes_split)
    assert not (torch.equal(p, p_local) and torch.equal(codes, codes_local))
