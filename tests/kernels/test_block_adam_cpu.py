"""The C row kernel for CPUs (``backend="native"``) against the PyTorch reference, and its build."""

from __future__ import annotations

import pytest
import torch
from _cases import ENTRIES, HPARAMS, TOL, make_tensors  # tests/kernels/_cases.py

import lightning_lowmem.kernels.block_adam_native as native_rows
from lightning_lowmem.kernels import block_adam_cpu, resolve
from lightning_lowmem.kernels.block_adam import block_mean_sq
from lightning_lowmem.optim.functional import block_adam
from lightning_lowmem.optim.placement import layout_for
from lightning_lowmem.partition import BlockSpec, ParamBlocks

pytestmark = pytest.mark.skipif(not block_adam_cpu.rows_kernel_available(), reason="no C compiler on this machine")

#: Every case at once: one call updates them all, like an optimizer step.
NAMES = sorted(ENTRIES)
#: The cases the kernel takes: every fp32 case.
NATIVE = set(ENTRIES)


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
    real = native_rows.block_adam_rows_

    def spy(params, *args, **kwargs):
        calls.append([tuple(p.shape) for p in params])
        return real(params, *args, **kwargs)

    monkeypatch.setattr(native_rows, "block_adam_rows_", spy)
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
    # one call per step, with the kernel's views: 1-D full tensors flat, 1-D tensor blocks as
    # rows of one entry, transposed ones as they are, fused QKV as its two segments (heads of 3
    # rows, then rows) unless it comes with reduced block means (then whole, a denominator per row)
    qkv = {(15, 7)} if options.get("reduced_means") else {(9, 7), (6, 7)}
    taken = {(6, 42), (1, 1), (1, 4097), (123, 431), (3, 2500), (4097, 1), (12, 42), (42, 6), (7, 12)} | qkv
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
    _step_all("compile", torch.float32)
    assert len(kernel_calls) == 3  # "compile" never takes it
    assert resolve("block_adam", "auto", "cpu").func is native_rows.block_adam_native_


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_rows_are_split_once_evenly_and_between_blocks(threads):
    shapes = [(5, 1000, 1), (123, 431, 1), (1, 70000, 1), (3, 2500, 3), (64, 64, 16), (12, 42, 3)]
    shares = block_adam_cpu._split_rows(shapes, threads)
    assert 1 <= len(shares) <= threads
    covered = {}
    for share in shares:
        for item, start, stop in share:
            assert start % shapes[item][2] == 0 and (stop - start) % shapes[item][2] == 0
            for row in range(start, stop):
                covered[(item, row)] = covered.get((item, row), 0) + 1
    assert covered == {(i, r): 1 for i, s in enumerate(shapes) for r in range(s[0])}
    sizes = [sum((stop - start) * shapes[item][1] for item, start, stop in share) for share in shares]
    largest_block = max(rows_per_block * cols for _, cols, rows_per_block in shapes)
    assert max(sizes) - min(sizes) <= 2 * largest_block


def test_block_segments():
    heads_then_rows = torch.tensor([0, 0, 1, 1, 2, 3, 4])
    assert native_rows.block_segments(heads_then_rows) == [(0, 4, 2, 0), (4, 7, 1, 2)]
    assert native_rows.block_segments(heads_then_rows) is native_rows.block_segments(heads_then_rows)  # cached
    assert native_rows.block_segments(torch.zeros(5, dtype=torch.long)) == [(0, 5, 5, 0)]
    assert native_rows.block_segments(torch.tensor([0, 1, 0])) is None  # a block that is not one run


@pytest.mark.parametrize("name", ["AdamMini", "Eve"])
def test_optimizer_with_native_backend_follows_the_reference(name, kernel_calls):
    import lightning_lowmem.optim as optim
    from lightning_lowmem.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    models = [GPT(GPTConfig.tiny(n_layer=1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [getattr(optim, name)(m, weight_decay=0.1, backend=b) for m, b in zip(models, ("torch", "native"))]
    for _ in range(3):
        idx = torch.randint(0, 256, (2, 16))
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(idx, idx)[1].backward()
            optimizer.step()
    # 1e-4: the key bias's gradient is rounding noise (attention ignores it), which Adam scales to
    # steps of lr; every other tensor agrees to 1e-7
    for (name_, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name_)
    assert sum(len(call) for call in kernel_calls) >= 3 * len(list(models[1].parameters()))


def test_empty_tensors_are_skipped(kernel_calls):
    """Empty tensors (an FSDP2 shard of a small tensor can be empty) change nothing and break nothing."""
    shapes = [(0, 5), (4, 0), (0,)]
    params = [torch.zeros(s) for s in shapes]
    layouts = [layout_for(ParamBlocks.single("w", s, BlockSpec("row" if len(s) == 2 else "full")), torch.device("cpu"))
               for s in shapes]
    exp_avg_sqs = [torch.zeros(s[0]) if len(s) == 2 else torch.zeros(s) for s in shapes]
    steps = [torch.tensor(0.0) for _ in shapes]
    block_adam(params, [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes], exp_avg_sqs, steps, layouts,
               backend="native", **HPARAMS)
    assert [s.item() for s in steps] == [1.0] * 3 and kernel_calls == []


def test_a_large_block_mean_is_summed_accurately():
    """One block over a whole 1024 x 1024 tensor: its mean of g**2 as close to fp64 as torch's sum."""
    entry = ParamBlocks.single("w", (1024, 1024), BlockSpec("tensor"))
    layout = layout_for(entry, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    grad = torch.rand(entry.shape, generator=gen) + 1.0  # all positive: rounding errors do not cancel
    exp_avg_sq = torch.zeros(1)
    block_adam([torch.zeros(entry.shape)], [grad], [torch.zeros(entry.shape)], [exp_avg_sq], [torch.tensor(0.0)],
               [layout], backend="native", **HPARAMS)
    exact = (1 - HPARAMS["beta2"]) * grad.double().square().mean()
    torch_error = abs((1 - HPARAMS["beta2"]) * grad.square().mean().double() - exact) / exact
    assert abs(exp_avg_sq.double() - exact) / exact <= max(4 * torch_error, 1e-7)


def test_one_minus_beta2_is_not_rounded_in_fp32():
    """At beta2 = 0.999, ``1 - beta2`` taken in fp32 is 1.3e-5 off: v would miss the reference by that much."""
    from _cases import second_moments_after_steps

    for got, expected in zip(second_moments_after_steps("native"), second_moments_after_steps("torch")):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
