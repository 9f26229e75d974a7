"""The block-Adam Triton kernels against the PyTorch reference (Triton's interpreter without a GPU).

Gradients are ~1e-3 and eps is 1e-4, so that eps is a tenth of sqrt(v): a misplaced eps or a
missing bias correction moves the result by far more than the tolerance (checked below).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from lightning_lowmem.optim.placement import layout_for  # noqa: E402
from lightning_lowmem.kernels.block_adam import adam_step_scalars, block_adam_update_, block_mean_sq  # noqa: E402
from lightning_lowmem.kernels.block_adam_triton import block_adam_update_triton_  # noqa: E402
from lightning_lowmem.kernels.layout import state_dtype  # noqa: E402
from _cases import DEVICE, ENTRIES, HPARAMS, TOL, make_tensors  # noqa: E402  (tests/kernels/_cases.py)

from lightning_lowmem.partition import BlockSpec, ParamBlocks  # noqa: E402

def _run(update, entry, dtype, *, maximize=False, reduced_means=False, scalars=adam_step_scalars):
    (p, m, v), grads = make_tensors(entry, dtype)
    layout = layout_for(entry, torch.device(DEVICE))
    for t, g in enumerate(grads, start=1):
        step_size, bc2 = scalars(t, HPARAMS["lr"], HPARAMS["beta1"], HPARAMS["beta2"])
        mean_sq = block_mean_sq(g, layout) if reduced_means and not layout.elementwise else None
        update(p, g, m, v, layout=layout, step_size=step_size, bias_correction2_sqrt=bc2, maximize=maximize,
               mean_sq=mean_sq, **HPARAMS)
    return p, m, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_triton_equals_reference(name, dtype):
    entry = ENTRIES[name]
    expected = _run(block_adam_update_, entry, dtype)
    got = _run(block_adam_update_triton_, entry, dtype)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])
    assert got[2].dtype == state_dtype(got[0])


@pytest.mark.parametrize("name", ["row_123x431", "fused_qkv", "full_6x42"])
def test_maximize_and_precomputed_block_means(name):
    entry = ENTRIES[name]
    for kwargs in (dict(maximize=True), dict(reduced_means=True)):
        expected = _run(block_adam_update_, entry, torch.float32, **kwargs)
        got = _run(block_adam_update_triton_, entry, torch.float32, **kwargs)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_tolerance_catches_a_missing_bias_correction():
    """The fp32 tolerance is tight enough to see the bias correction of the second moment."""
    entry = ENTRIES["row_123x431"]
    expected = _run(block_adam_update_, entry, torch.float32)
    no_bc2 = _run(block_adam_update_, entry, torch.float32, scalars=lambda t, lr, b1, b2: (adam_step_scalars(t, lr, b1, b2)[0], 1.0))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(no_bc2[0], expected[0], **TOL[torch.float32])


def test_tolerance_catches_eps_inside_the_square_root():
    entry = ENTRIES["row_123x431"]
    (p, m, v), grads = make_tensors(entry, torch.float32)
    layout = layout_for(entry, torch.device(DEVICE))
    expected = _run(block_adam_update_, entry, torch.float32)[0]
    for t, g in enumerate(grads, start=1):  # the same update, with sqrt(v_hat + eps) instead of sqrt(v_hat) + eps
        step_size, bc2 = adam_step_scalars(t, HPARAMS["lr"], HPARAMS["beta1"], HPARAMS["beta2"])
        p.mul_(1 - HPARAMS["lr"] * HPARAMS["weight_decay"])
        m.lerp_(g, 1 - HPARAMS["beta1"])
        v.mul_(HPARAMS["beta2"]).add_(block_mean_sq(g, layout), alpha=1 - HPARAMS["beta2"])
        p.add_(m / ((v / bc2**2 + HPARAMS["eps"]).sqrt()).unsqueeze(1) * -step_size)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(p, expected, **TOL[torch.float32])


def test_auto_backend_picks_triton_only_for_cuda():
    from lightning_lowmem.kernels import resolve
    from lightning_lowmem.kernels.block_adam_triton import block_adam_multi_update_triton_

    assert resolve("block_adam", "auto", "cuda") is block_adam_multi_update_triton_
    assert resolve("block_adam", "auto", "cpu") is not block_adam_multi_update_triton_
    assert resolve("block_adam", "triton", "cpu") is block_adam_multi_update_triton_


@pytest.mark.parametrize("name", ["AdamMini", "Eve"])
def test_optimizer_with_triton_backend_follows_the_reference(name):
    import lightning_lowmem.optim as optim
    from lightning_lowmem.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    models = [GPT(GPTConfig.tiny(n_layer=1)).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [getattr(optim, name)(m, backend=b) for m, b in zip(models, ("torch", "triton"))]
    for _ in range(3):
        idx = torch.randint(0, 256, (2, 16), device=DEVICE)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(idx, idx)[1].backward()
            optimizer.step()
    for (name_, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_tensors_share_one_launch(dtype, monkeypatch):
    """Biases and norms (full and one-block tensors) take one launch per kind, not one each."""
    from lightning_lowmem.kernels import block_adam_triton as kernels
    from lightning_lowmem.optim.functional import block_adam

    entries = [ParamBlocks.single(f"w{i}", shape, BlockSpec(kind)) for i, (shape, kind) in enumerate(
        [((1,), "full"), ((7,), "full"), ((768,), "full"), ((3, 5), "full"), ((4097,), "full"), ((6, 42), "full"),
         ((768,), "tensor"), ((33,), "tensor"), ((4, 6), "tensor"), ((123, 431), "row")])]
    launches = []
    real = kernels._adam_small_tensors_kernel
    monkeypatch.setattr(kernels, "_adam_small_tensors_kernel", _CountingLaunch(real, launches))

    def run(backend):
        cases = [make_tensors(entry, dtype, seed=i) for i, entry in enumerate(entries)]
        layouts = [layout_for(entry, torch.device(DEVICE)) for entry in entries]
        params, exp_avgs, exp_avg_sqs = ([case[0][k] for case in cases] for k in range(3))
        steps = [torch.tensor(0.0) for _ in entries]
        for t in range(3):
            block_adam(params, [case[1][t] for case in cases], exp_avgs, exp_avg_sqs, steps, layouts,
                       backend=backend, **HPARAMS)
        return params, exp_avgs, exp_avg_sqs

    expected = run("torch")
    got = run("triton")
    for e_list, g_list in zip(expected, got):
        for entry, e, g in zip(entries, e_list, g_list):
            torch.testing.assert_close(g.float(), e.float(), **TOL[dtype], msg=entry.name)
    assert launches == [(6, False), (3, True)] * 3  # per step: the 6 full tensors, the 3 one-block ones


class _CountingLaunch:
    """Stands in for a Triton kernel: records (programs, ONE_BLOCK) of each launch, then launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid[0], kwargs["ONE_BLOCK"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_one_minus_beta2_is_not_rounded_in_fp32():
    """At beta2 = 0.999, ``1 - beta2`` taken in fp32 is 1.3e-5 off: v would miss the reference by that much."""
    from _cases import second_moments_after_steps

    for got, expected in zip(second_moments_after_steps("triton"), second_moments_after_steps("torch")):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
