"""The functional API of MicroAdam: one step over lists of (local) tensors.

:func:`micro_adam` counts the steps and hands each tensor to the implementation
:func:`lightning_lowmem.kernels.resolve` picks for ``backend``. The update and its math are in
:mod:`lightning_lowmem.kernels.micro_adam`; the layout and state format in
:mod:`lightning_lowmem.kernels.micro_adam_layout`.

Example::

    >>> layout = micro_adam_layout(16, 1000, block_size=256, density=0.02)
    >>> p, g, step = torch.randn(16, 1000), torch.randn(16, 1000), torch.tensor(0.0)
    >>> micro_adam([p], [g], *([t] for t in init_state(p, layout, window=4)), [step], [layout],
    ...            lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

from torch import Tensor

from lightning_lowmem.kernels import MicroAdamLayout, resolve


def micro_adam(
    params: list[Tensor],
    grads: list[Tensor],
    windows: list[Tensor],
    errors: list[Tensor | None],
    error_mins: list[Tensor | None],
    error_maxs: list[Tensor | None],
    state_steps: list[Tensor],
    layouts: list[MicroAdamLayout],
    *,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    backend: str = "torch",
) -> None:
    """One MicroAdam step over lists of (local) tensors (increments ``state_steps``).

    Args:
        errors, error_mins, error_maxs: per tensor, its error-feedback state, or ``None`` (all three)
            for a tensor updated without error feedback.
        layouts: per tensor, the layout of the rows given (a shard's rows under FSDP2).
        backend: one of :data:`lightning_lowmem.kernels.BACKENDS`, resolved by
            :func:`lightning_lowmem.kernels.resolve` for each tensor's device.
    """
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    for i, param in enumerate(params):
        step = state_steps[i]
        step += 1
        if layouts[i].rows == 0:
            continue
        update = resolve("micro_adam", backend, param.device)
        update(param, grads[i], windows[i], errors[i], error_mins[i], error_maxs[i], step.item(), layout=layouts[i],
               lr=lr_value, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
