"""The C row kernel for CPUs (``backend="native"``) against the PyTorch reference, and its build."""

from __future__ import annotations

import warnings

import pytest
import torch
from _cases import ENTRIES, HPARAMS, TOL, make_tensors  # tests/kernels/_cases.py

import lightning_lowmem.optim.functional as functional
from lightning_lowmem.kernels import block_adam_cpu, dispatch, native
from lightning_lowmem.optim.block_adam import layout_for
from lightning_lowmem.optim.functional import block_adam, block_mean_sq

pytestmark = pytest.mark.skipif(not block_adam_cpu.rows_kernel_available(), reason="no C compiler on this machine")

#: Every case at once: one call updates them all, like an optimizer step.
NAMES = sorted(ENTRIES)
#: The cases the kernel takes (fp32 row blocks with rows of at least MIN_COLS entries, not transposed).
NATIVE = {"row_123x431", "row_wide_3x2500", "head_of_3_rows"}


def _step_all(backend: str, dtype: torch.dtype, *, maximize: bool = False, reduced_means: bool = False):
    cases = [make_tensors(ENTRIES[name], dtype, seed=i) for i, name in enumerate(NAMES)]
    layouts = [layout_for(ENTRIES[name], torch.device("cpu")) for name in NAMES]
    steps = [torch.tensor(0.0) for _ in NAMES]
    params, exp_avgs, exp_avg_sqs = ([case[0][k] for case in cases] for k in range(3))
    for t in range(3):
        grads = [case[1][t] for case in cases]
        mean_sqs = [block_mean_sq(g, layout) if reduced_means and not layout.elementwise else None
                    for g, layout in zip(grads, layouts)]
        block_adam(params, grads, exp_avgs, exp_avg_sqs, steps, layouts, maximize=maximize, mean_sqs=mean_sqs,
                   backend=backend, **{k: v for k, v in HPARAMS.items()})
    return dict(zip(NAMES, zip(params, exp_avgs, exp_avg_sqs))), steps


@pytest.fixture
def kernel_calls(monkeypatch):
    """The shapes of the tensors each call hands to the C kernel."""
    calls: list[list[tuple[int, ...]]] = []
    real = functional.block_adam_rows_

    def spy(params, *args, **kwargs):
        calls.append([tuple(p.shape) for p in params])
        return real(params, *args, **kwargs)

    monkeypatch.setattr(functional, "block_adam_rows_", spy)
    return calls


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("options", [{}, {"maximize": True}, {"reduced_means": True}], ids=["plain", "maximize", "reduced_means"])
def test_native_equals_reference(kernel_calls, threads, options):
    expected, _ = _step_all("torch", torch.float32, **options)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, steps = _step_all("native", torch.float32, **options)
    finally:
        torch.set_num_threads(previous)
    for name in NAMES:
        for e, g in zip(expected[name], got[name]):
            torch.testing.assert_close(g, e, **TOL[torch.float32], msg=name)
    assert [s.item() for s in steps] == [3.0] * len(NAMES)
    taken = {tuple(ENTRIES[name].shape) for name in NATIVE}
    assert len(kernel_calls) == 3 and all(set(call) == taken for call in kernel_calls)


def test_bf16_tensors_take_the_compiled_path(kernel_calls):
    expected, _ = _step_all("torch", torch.bfloat16)
    got, _ = _step_all("native", torch.bfloat16)
    for name in NAMES:
        for e, g in zip(expected[name], got[name]):
            torch.testing.assert_close(g.float(), e.float(), **TOL[torch.bfloat16], msg=name)
    assert kernel_calls == []


def test_auto_takes_the_kernel_on_cpu(kernel_calls):
    _step_all("auto", torch.float32)
    assert len(kernel_calls) == 3
    assert dispatch.rows_kernel_wanted("compile", torch.device("cpu")) is False


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_rows_are_split_once_and_evenly(threads):
    shapes = [torch.Size(s) for s in [(5, 1000), (123, 431), (1, 70000), (3, 2500), (64, 64)]]
    shares = block_adam_cpu._split_rows(shapes, threads)
    assert 1 <= len(shares) <= threads
    covered = {}
    for share in shares:
        for item, start, stop in share:
            for row in range(start, stop):
                covered[(item, row)] = covered.get((item, row), 0) + 1
    assert covered == {(i, r): 1 for i, s in enumerate(shapes) for r in range(s[0])}
    sizes = [sum((stop - start) * shapes[item][1] for item, start, stop in share) for share in shares]
    widest = max(s[1] for s in shapes)
    assert max(sizes) - min(sizes) <= 2 * widest


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache, and no library loaded yet in this process (restored afterwards)."""
    monkeypatch.setenv("LIGHTNING_LOWMEM_CACHE", str(tmp_path))
    caches = (native.load_library, block_adam_cpu._kernel, dispatch._warn_once)
    for cache in caches:
        cache.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()


def test_library_is_built_once_and_reused(fresh_build):
    assert native.load_library("block_adam_rows") is not None
    built = list((fresh_build / "kernels").glob("block_adam_rows-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.load_library.cache_clear()
    assert native.load_library("block_adam_rows") is not None
    assert [p.stat().st_mtime_ns for p in (fresh_build / "kernels").glob("block_adam_rows-*.so")] == [stamp]


def test_without_a_compiler_native_warns_once_and_compiles(fresh_build, monkeypatch, kernel_calls):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    assert native.find_compiler() is None
    expected, _ = _step_all("torch", torch.float32)
    with pytest.warns(RuntimeWarning, match="C kernel for AdamMini/Eve rows cannot be built"):
        got, _ = _step_all("native", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step_all("native", torch.float32)
        _step_all("auto", torch.float32)  # auto only logs
    assert kernel_calls == []
    for name in NAMES:
        for e, g in zip(expected[name], got[name]):
            torch.testing.assert_close(g, e, **TOL[torch.float32], msg=name)
