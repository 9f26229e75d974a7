r"""MicroAdam's window math: per-block top-k, ring-buffer ages and weights, the dense update.

Step :math:`t` (counted from 1) writes ring slot :math:`(t-1) \bmod m` with the top-k of each
block; the update is then

.. math::

    M = \textstyle\sum_j \beta_1^{j} V_{(t-j)},\quad S = \sum_j \beta_2^{j} V_{(t-j)}^2,\quad
    u = \frac{c_1 M}{\sqrt{c_2 S} + \epsilon},\qquad j < \min(t, m)

with :math:`c_1 = (1-\beta_1)/(1-\beta_1^t)` and :math:`c_2 = (1-\beta_2)/(1-\beta_2^t)` (AdamW's
bias correction of the exponential sums). Coordinates never selected in the window get
:math:`u = 0`, and so does a coordinate with :math:`\sqrt{c_2 S} + \epsilon = 0`.

Example::

    >>> window_ages(6.0, 4, torch.device("cpu"))   # slot 1 was written at step 6
    tensor([1, 0, 3, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lowmem.kernels.micro_adam_layout import MicroAdamLayout
from lightning_lowmem.kernels.micro_adam_packing import unpack_window_entries


def block_topk(a: Tensor, layout: MicroAdamLayout) -> tuple[Tensor, Tensor]:
    """Step 2: per block of each row, the ``k`` coordinates of largest ``|a|``: indices relative to the block, values.

    Returns ``(indices int64 [rows, K], values [rows, K])`` with ``K = layout.topk_per_row``; in a
    row the full blocks come first (``k`` each), then the last block (``k_last``). Two ``topk``
    calls, no loop.

    Example::

        >>> block_topk(torch.tensor([[0.1, -3.0, 2.0, 0.0, 5.0]]), micro_adam_layout(1, 5, block_size=4, density=0.25))
        (tensor([[1, 1]]), tensor([[-3.,  5.]]))
    """
    rows = a.shape[0]
    split = layout.full_blocks * layout.block_len
    indices, values = [], []
    if layout.full_blocks:
        blocks = a[:, :split].reshape(rows, layout.full_blocks, layout.block_len)
        idx = blocks.abs().topk(layout.k, dim=2, sorted=False).indices
        indices.append(idx.view(rows, -1))
        values.append(blocks.gather(2, idx).view(rows, -1))
    if layout.k_last:
        tail = a[:, split:]
        idx = tail.abs().topk(layout.k_last, dim=1, sorted=False).indices
        indices.append(idx)
        values.append(tail.gather(1, idx))
    if len(indices) == 1:
        return indices[0], values[0]
    return torch.cat(indices, dim=1), torch.cat(values, dim=1)


def block_offsets(layout: MicroAdamLayout, device: torch.device) -> Tensor:
    """For each entry of a window row, the column where its block starts (int64 ``[K]``)."""
    # repeat_interleave, not ``column // k``: Inductor's CPU code for int64 floor division by a
    # constant returns garbage past the first vector (torch 2.13)
    full = torch.arange(layout.full_blocks, device=device).repeat_interleave(layout.k)
    last = torch.full((layout.k_last,), layout.full_blocks, dtype=torch.int64, device=device)
    return torch.cat((full, last)) * layout.block_len


def window_ages(step: Tensor | float, window: int, device: torch.device) -> Tensor:
    """Age of each ring slot at step ``step`` (0 = written this step), ``window`` for unwritten slots.

    Step ``t`` (from 1) writes slot ``(t - 1) mod window``.

    Example::

        >>> window_ages(2.0, 4, torch.device("cpu")), window_ages(6.0, 4, torch.device("cpu"))
        (tensor([1, 0, 4, 4]), tensor([1, 0, 3, 2]))
    """
    t = torch.as_tensor(step, device=device).to(torch.int64)
    ages = (t - 1 - torch.arange(window, device=device)) % window
    return torch.where(ages < t, ages, window)


def newest_slot(step: Tensor | float, window: int, device: torch.device) -> Tensor:
    """The ring slot step ``step`` writes, ``(step - 1) mod window``, as a 1-element int64 tensor."""
    return ((torch.as_tensor(step, device=device).to(torch.int64) - 1) % window).view(1)


def window_weights(ages: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    r"""``(beta1**age, beta2**age)`` per ring slot (fp32), 0 for unwritten slots (age ``window``)."""
    written = ages < ages.numel()
    age = ages.float()
    return torch.where(written, beta1**age, 0.0), torch.where(written, beta2**age, 0.0)


def bias_factors(step: Tensor | float, beta1: float, beta2: float) -> tuple[Tensor | float, Tensor | float]:
    r""":math:`c_1 = (1-\beta_1)/(1-\beta_1^t)`, :math:`c_2 = (1-\beta_2)/(1-\beta_2^t)`.

    They turn the window's exponential sums into AdamW's bias-corrected moments: with the same
    gradient in every slot, :math:`c_1 M = g` and :math:`c_2 S = g^2` for :math:`t \le m`.
    """
    return (1 - beta1) / (1 - beta1**step), (1 - beta2) / (1 - beta2**step)


def window_update(
    window: Tensor,
    weights1: Tensor,
    weights2: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
    eps: float,
    layout: MicroAdamLayout,
) -> Tensor:
    r"""Step 6: the dense update :math:`u = c_1 M / (\sqrt{c_2 S} + \epsilon)` (fp32, ``rows x cols``).

    :math:`M = \sum_s w^{(1)}_s V_s` and :math:`S = \sum_s w^{(2)}_s V_s^2` over the ring slots,
    each scattered to its coordinates within its row (slots with weight 0 add nothing);
    :math:`u = 0` where the denominator is 0.

    Example::

        >>> layout = micro_adam_layout(1, 4, block_size=4, density=0.25)
        >>> entries = pack_window_entries(torch.tensor([[[2], [2]]]), torch.tensor([[[3.0], [3.0]]]))
        >>> window_update(entries, torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5]), 1 / 1.5, 1 / 1.5, 0.0, layout)
        tensor([[0., 0., 1., 0.]])
    """
    rows = window.shape[0]
    indices, values = unpack_window_entries(window)
    cols = (indices.long() + block_offsets(layout, window.device)).view(rows, -1)
    exp_sum = torch.zeros(rows, layout.cols, dtype=torch.float32, device=window.device)
    exp_sum.scatter_add_(1, cols, (values * weights1.view(1, -1, 1)).view(rows, -1))
    sq_sum = torch.zeros_like(exp_sum).scatter_add_(1, cols, (values * values * weights2.view(1, -1, 1)).view(rows, -1))
    denom = (sq_sum * c2).sqrt() + eps
    nonzero = denom > 0
    return torch.where(nonzero, (exp_sum * c1) / torch.where(nonzero, denom, 1.0), 0.0)


def apply_window_update_(
    param_rows: Tensor,
    window: Tensor,
    ages: Tensor,
    weights1: Tensor,
    weights2: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
    eps: float,
    lr: Tensor | float,
    layout: MicroAdamLayout,
) -> None:
    """Steps 6-7: ``param_rows -= lr * u`` (``rows x cols``) in fp32, rounded once to the parameter's dtype.

    ``ages`` is unused here (the weights already zero unwritten slots); the Triton twin needs it.
    """
    update = window_update(window, weights1, weights2, c1, c2, eps, layout)
    param_rows.sub_(update.mul_(lr))
