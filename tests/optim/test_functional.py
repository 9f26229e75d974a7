"""The block-Adam update against AdamW and against a naive per-block computation written here."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lowmem.optim import BlockAdam
from lightning_lowmem.partition import BlockPlan, BlockSpec, ParamBlocks

BETAS = (0.9, 0.99)
EPS = 1e-8
LR = 1e-2
WD = 0.1


def _naive_block_adam(p, grads, entry: ParamBlocks, lr=LR, betas=BETAS, eps=EPS, wd=WD):
    """Adam-mini for one tensor, block by block with Python loops, in float64."""
    p = p.detach().double().clone()
    rows_view = (lambda t: t.t()) if entry.transposed else (lambda t: t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1))
    m = torch.zeros_like(p)
    blocks = []  # (row start, row count) per block
    start = 0
    for spec, rows in entry.segments:
        size = {"row": 1, "head": spec.head_dim, "tensor": rows}.get(spec.kind, None)
        for r in range(start, start + rows, size):
            blocks.append((r, size))
        start += rows
    v = [0.0] * len(blocks)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p.mul_(1 - lr * wd)
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        p_rows, g_rows, m_rows = rows_view(p), rows_view(g), rows_view(m)
        for b, (r, size) in enumerate(blocks):
            block_g = g_rows[r : r + size]
            v[b] = betas[1] * v[b] + (1 - betas[1]) * float(block_g.pow(2).mean())
            v_hat = v[b] / (1 - betas[1] ** t)
            m_hat = m_rows[r : r + size] / (1 - betas[0] ** t)
            p_rows[r : r + size] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def _run(param, grads, plan, dtype, backend="torch", **kwargs):
    param = torch.nn.Parameter(param.detach().clone().to(dtype))
    opt = BlockAdam([("w", param)], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, plan=plan, backend=backend, **kwargs)
    for g in grads:
        param.grad = g.to(dtype)
        opt.step()
    return param.detach(), opt


@pytest.mark.parametrize("shape", [(6, 42), (7,), ()])
@pytest.mark.parametrize("options", [dict(weight_decay=WD), dict(weight_decay=0.0), dict(weight_decay=WD, maximize=True),
                                     dict(weight_decay=WD, lr=torch.tensor(LR))],
                         ids=["decay", "no_decay", "maximize", "tensor_lr"])
def test_all_full_blocks_are_adamw_bit_for_bit(shape, options):
    """The eager path runs AdamW's single-tensor operations in its order: equal, not close, over 20 fp32 steps."""
    options = {"lr": LR, **options}
    torch.manual_seed(0)
    init = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(20)]
    plan = BlockPlan([ParamBlocks.single("w", shape, BlockSpec("full"))])
    param = torch.nn.Parameter(init.clone())
    ours = BlockAdam([("w", param)], betas=BETAS, eps=EPS, plan=plan, backend="torch", **options)
    ref = torch.nn.Parameter(init.clone())
    adamw = torch.optim.AdamW([ref], betas=BETAS, eps=EPS, foreach=False, **options)
    for g in grads:
        param.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        adamw.step()
        assert torch.equal(param, ref)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[param][key], adamw.state[ref][key])


def _allocations(fn, nbytes: int) -> int:
    """Operators that allocate a tensor of at least ``nbytes`` on the CPU while ``fn`` runs (the
    0-dim tensors that wrap Python scalars do not count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::") and event.cpu_memory_usage >= nbytes)


@pytest.mark.parametrize("maximize", [False, True])
def test_the_full_update_allocates_no_more_than_adamw(maximize):
    """Only the denominator (and, with ``maximize``, ``-g``), as ``torch.optim.AdamW``'s own step."""
    from torch.optim.adam import _single_tensor_adam

    from lightning_lowmem.kernels.block_adam import adam_step_scalars, block_adam_update_
    from lightning_lowmem.kernels.layout import RowLayout

    p, g, m, v = (torch.rand(64, 64) for _ in range(4))
    step_size, bc2 = adam_step_scalars(3, LR, *BETAS)

    def ours():
        block_adam_update_(p, g, m, v, layout=RowLayout(), lr=LR, step_size=step_size, bias_correction2_sqrt=bc2,
                           beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, maximize=maximize)

    def adamw():
        _single_tensor_adam([p], [g], [m], [v], [], [torch.tensor(2.0)], grad_scale=None, found_inf=None,
                            amsgrad=False, has_complex=False, beta1=BETAS[0], beta2=BETAS[1], lr=LR,
                            weight_decay=WD, eps=EPS, maximize=maximize, capturable=False, differentiable=False,
                            decoupled_weight_decay=True)

    ours_count, adamw_count = _allocations(ours, p.nbytes), _allocations(adamw, p.nbytes)
    assert ours_count == 1 + maximize
    assert ours_count <= adamw_count


ENTRIES = {
    "row": ParamBlocks.single("w", (12, 5), BlockSpec("row")),
    "head": ParamBlocks.single("w", (12, 5), BlockSpec("head", head_dim=3)),
    "tensor": ParamBlocks.single("w", (12, 5), BlockSpec("tensor")),
    "tensor_1d": ParamBlocks.single("w", (9,), BlockSpec("tensor")),
    "fused_qkv_gqa": ParamBlocks("w", (16, 5), ((BlockSpec("head", head_dim=4), 8), (BlockSpec("head", head_dim=4), 4), (BlockSpec("row"), 4))),
    "paper_qkv": ParamBlocks("w", (12, 5), ((BlockSpec("head", head_dim=2), 4), (BlockSpec("head", head_dim=2), 4), (BlockSpec("tensor"), 4))),
    "conv1d_transposed": ParamBlocks("w", (5, 12), ((BlockSpec("head", head_dim=3), 6), (BlockSpec("row"), 6)), transposed=True),
    "conv_4d_rows": ParamBlocks.single("w", (4, 3, 2, 2), BlockSpec("row")),
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_blocks_equal_naive_per_block_computation(name):
    entry = ENTRIES[name]
    torch.manual_seed(1)
    # rows of very different scale, so that a wrong grouping changes the result
    scale = torch.logspace(-2, 1, steps=entry.rows, dtype=torch.float64)
    init = torch.randn(entry.shape, dtype=torch.float64)
    grads = []
    for _ in range(8):
        g = torch.randn(entry.shape, dtype=torch.float64)
        g = g * scale if entry.transposed else (g.reshape(entry.rows, -1) * scale[:, None]).reshape(entry.shape)
        grads.append(g)
    ours, opt = _run(init, grads, BlockPlan([entry]), torch.float64)
    expected = _naive_block_adam(init, grads, entry)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    assert tuple(opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"].shape) == entry.state_shape()


def test_a_wrong_grouping_would_be_detected():
    """The naive check is sensitive: row blocks and head blocks give different weights."""
    torch.manual_seed(1)
    init = torch.randn(12, 5, dtype=torch.float64)
    grads = [torch.randn(12, 5, dtype=torch.float64) * torch.logspace(-2, 1, 12, dtype=torch.float64)[:, None] for _ in range(4)]
    by_row, _ = _run(init, grads, BlockPlan([ENTRIES["row"]]), torch.float64)
    by_head = _naive_block_adam(init, grads, ENTRIES["head"])
    assert (by_row - by_head).abs().max() > 1e-4


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager must fail the test
def test_compiled_path_equals_reference():
    torch.manual_seed(2)
    entries = [ENTRIES[name] for name in ("fused_qkv_gqa", "conv1d_transposed", "tensor", "tensor_1d", "row")]
    entries.append(ParamBlocks.single("w", (7,), BlockSpec("full")))
    for entry in entries:
        init = torch.randn(entry.shape)
        grads = [torch.randn(entry.shape) for _ in range(3)]
        eager, _ = _run(init, grads, BlockPlan([entry]), torch.float32, backend="torch")
        compiled, _ = _run(init, grads, BlockPlan([entry]), torch.float32, backend="compile")
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def test_bf16_params_keep_fp32_second_moment_and_follow_fp32_run():
    torch.manual_seed(3)
    entry = ENTRIES["row"]
    init = torch.randn(entry.shape)
    grads = [torch.randn(entry.shape) for _ in range(5)]
    low, opt = _run(init, grads, BlockPlan([entry]), torch.bfloat16)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg_sq"].dtype == torch.float32
    assert state["exp_avg"].dtype == torch.bfloat16
    high, _ = _run(init, grads, BlockPlan([entry]), torch.float32)
    torch.testing.assert_close(low.float(), high, atol=2e-2, rtol=0)


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_compiled_path_does_not_recompile_for_a_new_lr_or_step():
    """A scheduler's new learning rate and a growing step count reach the graph as tensors."""
    torch.manual_seed(4)
    entries = [ParamBlocks.single("rows", (12, 5), BlockSpec("row")), ParamBlocks.single("heads", (12, 5), BlockSpec("head", head_dim=3)),
               ParamBlocks.single("bias", (7,), BlockSpec("full"))]
    params = [torch.nn.Parameter(torch.randn(e.shape)) for e in entries]
    opt = BlockAdam([(e.name, p) for e, p in zip(entries, params)], lr=1e-2, plan=BlockPlan(entries), backend="compile")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    graphs = []
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        scheduler.step()
        graphs.append(_compiled_graphs())
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 4
