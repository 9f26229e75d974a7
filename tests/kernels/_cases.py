"""Shared cases for the block-Adam kernel tests: awkward shapes and hyperparameters under which a
misplaced eps or a missing bias correction moves the result by far more than the tolerance
(gradients ~1e-3, eps 1e-4: eps is a tenth of sqrt(v))."""

from __future__ import annotations

import torch

from lightning_lowmem.partition import BlockSpec, ParamBlocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HPARAMS = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-4, weight_decay=0.1)
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}

ENTRIES = {
    "full_6x42": ParamBlocks.single("w", (6, 42), BlockSpec("full")),
    "full_1": ParamBlocks.single("w", (1,), BlockSpec("full")),
    "full_4097": ParamBlocks.single("w", (4097,), BlockSpec("full")),
    "row_123x431": ParamBlocks.single("w", (123, 431), BlockSpec("row")),
    "row_1x1": ParamBlocks.single("w", (1, 1), BlockSpec("row")),
    "row_wide_3x2500": ParamBlocks.single("w", (3, 2500), BlockSpec("row")),
    "tensor_4097": ParamBlocks.single("w", (4097,), BlockSpec("tensor")),
    "head_of_3_rows": ParamBlocks.single("w", (12, 42), BlockSpec("head", head_dim=3)),
    "fused_qkv": ParamBlocks("w", (15, 7), ((BlockSpec("head", head_dim=3), 6), (BlockSpec("head", head_dim=3), 3), (BlockSpec("row"), 6))),
    "transposed_rows": ParamBlocks.single("w", (42, 6), BlockSpec("row"), transposed=True),
    "transposed_heads": ParamBlocks.single("w", (7, 12), BlockSpec("head", head_dim=3), transposed=True),
}


def make_tensors(entry: ParamBlocks, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(entry.shape, generator=gen).to(dtype)
    m = (torch.randn(entry.shape, generator=gen) * 1e-3).to(dtype)
    v = torch.rand(entry.state_shape(), generator=gen, dtype=torch.float32) * 1e-6
    grads = [(torch.randn(entry.shape, generator=gen) * 1e-3).to(dtype) for _ in range(3)]
    return [t.to(DEVICE) for t in (p, m, v)], [g.to(DEVICE) for g in grads]


def second_moments_after_steps(backend: str, beta2: float = 0.999, steps: int = 3) -> list[torch.Tensor]:
    """``v`` of a row-block and a ``full`` tensor after ``steps`` steps of :func:`block_adam` on ``backend``."""
    from lightning_lowmem.optim.placement import layout_for
    from lightning_lowmem.optim.functional import block_adam

    entries = [ENTRIES["row_123x431"], ENTRIES["full_6x42"]]
    cases = [make_tensors(entry, torch.float32, seed=i) for i, entry in enumerate(entries)]
    params, exp_avgs, exp_avg_sqs = ([case[0][k] for case in cases] for k in range(3))
    layouts = [layout_for(entry, torch.device(DEVICE)) for entry in entries]
    counters = [torch.tensor(0.0) for _ in entries]
    for t in range(steps):
        block_adam(params, [case[1][t] for case in cases], exp_avgs, exp_avg_sqs, counters, layouts,
                   backend=backend, **{**HPARAMS, "beta2": beta2})
    return exp_avg_sqs
