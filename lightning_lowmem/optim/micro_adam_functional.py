r"""MicroAdam's functional core: compressed gradient window, 4-bit error feedback, one pure update.

A parameter is flattened to :math:`d` coordinates, cut into blocks of ``block_size`` (the last
block may be shorter) and into quantisation buckets of ``quant_bucket``. Its state is

* a ring buffer of the last :math:`m` (``window``) sparse gradients: per row, ``k`` indices per
  block (``int16``, relative to the block) and their signed values (``bfloat16``);
* the error feedback :math:`e`: one 4-bit code per coordinate, two codes per ``uint8`` (coordinate
  ``2i`` in the low nibble, ``2i+1`` in the high one), with a ``bfloat16`` min and max per bucket.

One step :math:`t` (counted from 1) with gradient :math:`g`:

.. math::

    a &= g + \mathrm{deq}(e)                                              && \text{1. error feedback}\\
    I_b &= \operatorname{top-k}_{i \in b} |a_i|,\quad V_{(t-1) \bmod m} = a_I && \text{2. per-block top-k}\\
    r &= a \text{ with } a_I = 0                                           && \text{3. residual}\\
    e &= \mathrm{round}\big((r - \min_q r) / \tfrac{\max_q r - \min_q r}{15}\big) && \text{4. per bucket } q\\
    \theta &\leftarrow \theta (1 - \eta\lambda)                            && \text{5. weight decay}\\
    M &= \textstyle\sum_j \beta_1^{j} V_{(t-j)},\;\; S = \sum_j \beta_2^{j} V_{(t-j)}^2,\;\;
    u = \frac{c_1 M}{\sqrt{c_2 S} + \epsilon}                              && \text{6. } j < \min(t, m)\\
    \theta &\leftarrow \theta - \eta\, u                                   && \text{7.}

with :math:`c_1 = (1-\beta_1)/(1-\beta_1^t)` and :math:`c_2 = (1-\beta_2)/(1-\beta_2^t)` (AdamW's
bias correction of the exponential sums), :math:`\mathrm{deq}(c) = \min_q + c\,(\max_q-\min_q)/15`
and :math:`\mathrm{round}(x) = \lfloor x + 1/2 \rfloor` clamped to ``[0, 15]``. A bucket whose
max equals its min stores code 0 (it dequantises to the min exactly: no division by zero). The
min and max are rounded to ``bfloat16`` before the codes are computed, so quantising and
dequantising use the same numbers; the error of one coordinate is then at most half a step,
:math:`(\max_q-\min_q)/30`, plus the ``bfloat16`` rounding of the min/max (:math:`\le 2^{-9}`
of their magnitude). As in the paper, the selected coordinates leave the error feedback whole:
the ``bfloat16`` rounding of :math:`V` is not fed back. Coordinates never selected in the window
get :math:`u = 0`, and so does a coordinate with :math:`\sqrt{c_2 S} + \epsilon = 0`.

State: :math:`0.5 + 4/\text{bucket} + 4 m k / \text{block}` bytes per coordinate, 0.96 at the
defaults (:math:`m = 10`, 41 of 4096 per block, bucket 64), against 8 for fp32 AdamW.

:func:`micro_adam_update_` is the reference (pure PyTorch, vectorised, runnable under
``torch.compile``); :func:`micro_adam_update_triton_` has the same signature and result and runs
the three hot parts (dequantise-and-add, min/max + quantise, window rebuild + apply) as Triton
kernels from :mod:`lightning_lowmem.kernels.micro_adam_triton`. :func:`micro_adam` is the
functional API over lists of tensors.

Example::

    >>> layout = micro_adam_layout(1000, block_size=256, density=0.02, quant_bucket=64)
    >>> p, g = torch.randn(1000), torch.randn(1000)
    >>> state = init_state(p, layout, window=4)
    >>> micro_adam_update_(p, g, *state, 1.0, layout=layout, lr=1e-3, beta1=0.9, beta2=0.999,
    ...                    eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lowmem.kernels.dispatch import resolve_update

#: Coordinates per top-k block. Fixed (not derived from the GPU's shared memory as in the official
#: code) so that a checkpoint means the same on every device. 4096 keeps relative indices well
#: inside int16 (0..4095), gives k = 41 at 1% (rounding k up keeps 0.1% more), and keeps the
#: ``window x k`` = 410 entries of one block within one Triton program's reach.
DEFAULT_BLOCK_SIZE = 4096
#: Largest block whose relative indices fit ``int16``.
MAX_BLOCK_SIZE = 32768
#: Highest 4-bit code: a bucket's range is cut into 15 steps.
QUANT_LEVELS = 15


class MicroAdamLayout(NamedTuple):
    """How one flattened tensor is cut into top-k blocks and quantisation buckets.

    Args:
        numel: coordinates of the tensor (:math:`d`).
        block_size: coordinates per top-k block.
        k: coordinates kept per full block.
        k_last: coordinates kept in the shorter last block (0 when ``numel % block_size == 0``).
        quant_bucket: coordinates per min/max bucket of the error feedback.
    """

    numel: int
    block_size: int
    k: int
    k_last: int
    quant_bucket: int

    @property
    def full_blocks(self) -> int:
        """Blocks of exactly ``block_size`` coordinates."""
        return self.numel // self.block_size

    @property
    def topk_per_row(self) -> int:
        """Entries of one window row: ``k`` per full block plus ``k_last``."""
        return self.full_blocks * self.k + self.k_last

    @property
    def num_blocks(self) -> int:
        """Blocks, the shorter last one included."""
        return -(-self.numel // self.block_size)

    @property
    def num_buckets(self) -> int:
        """Quantisation buckets (the last one may be shorter)."""
        return -(-self.numel // self.quant_bucket)

    @property
    def packed_numel(self) -> int:
        """Bytes of the packed 4-bit error: two codes per byte."""
        return (self.numel + 1) // 2

    def state_bytes(self, window: int) -> int:
        """Bytes of the compressed state of one tensor (``step`` excluded).

        Example::

            >>> micro_adam_layout(768 * 3072).state_bytes(10) / (768 * 3072)
            0.962890625
        """
        return self.packed_numel + 2 * 2 * self.num_buckets + window * self.topk_per_row * (2 + 2)


def topk_count(n: int, density: float) -> int:
    """Coordinates kept in a block of ``n``: ``ceil(density * n)``, at least 1, at most ``n``.

    Example::

        >>> topk_count(4096, 0.01), topk_count(63, 0.01), topk_count(4096, 1e-9)
        (41, 1, 1)
    """
    return min(n, max(1, math.ceil(round(density * n, 9))))


def check_micro_adam_hparams(window: int, density: float, block_size: int, quant_bucket: int) -> None:
    """Validate MicroAdam's compression settings.

    Raises:
        ValueError: naming the first value outside its range.
    """
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"Invalid window: {window!r} (must be an int >= 1: the number of sparse gradients kept).")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"Invalid density: {density!r} (must be in (0, 1]: the fraction of each block kept).")
    if not (isinstance(block_size, int) and 1 <= block_size <= MAX_BLOCK_SIZE):
        raise ValueError(
            f"Invalid block_size: {block_size!r} (must be an int in [1, {MAX_BLOCK_SIZE}] so that indices "
            "relative to their block fit int16)."
        )
    if not (isinstance(quant_bucket, int) and quant_bucket >= 2 and quant_bucket % 2 == 0):
        raise ValueError(
            f"Invalid quant_bucket: {quant_bucket!r} (must be an even int >= 2: two 4-bit codes share a byte)."
        )


def micro_adam_layout(
    numel: int, *, block_size: int = DEFAULT_BLOCK_SIZE, density: float = 0.01, quant_bucket: int = 64
) -> MicroAdamLayout:
    """The :class:`MicroAdamLayout` of a tensor of ``numel`` coordinates.

    Example::

        >>> micro_adam_layout(4097)
        MicroAdamLayout(numel=4097, block_size=4096, k=41, k_last=1, quant_bucket=64)
    """
    check_micro_adam_hparams(1, density, block_size, quant_bucket)
    if numel < 1:
        raise ValueError(f"Cannot compress an empty tensor (numel={numel}).")
    tail = numel % block_size
    return MicroAdamLayout(
        numel=numel,
        block_size=block_size,
        k=topk_count(block_size, density),
        k_last=topk_count(tail, density) if tail else 0,
        quant_bucket=quant_bucket,
    )


def init_state(param: Tensor, layout: MicroAdamLayout, window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Zero state ``(window_indices, window_values, error, error_min, error_max)`` on ``param``'s device.

    A zero error (codes 0, min = max = 0) dequantises to exactly 0.
    """
    device = param.device
    return (
        torch.zeros(window, layout.topk_per_row, dtype=torch.int16, device=device),
        torch.zeros(window, layout.topk_per_row, dtype=torch.bfloat16, device=device),
        torch.zeros(layout.packed_numel, dtype=torch.uint8, device=device),
        torch.zeros(layout.num_buckets, dtype=torch.bfloat16, device=device),
        torch.zeros(layout.num_buckets, dtype=torch.bfloat16, device=device),
    )


# ---- 4-bit error feedback ------------------------------------------------------------------------


def _bucketed(x: Tensor, bucket: int) -> Tensor:
    """``x`` (1-D) as ``[buckets, bucket]``, the last bucket padded with copies of ``x[-1]`` (a value
    of that bucket, so its min and max do not change)."""
    pad = -x.numel() % bucket
    if pad:
        x = torch.cat((x, x[-1:].expand(pad)))
    return x.view(-1, bucket)


def round_to_bf16(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), still fp32, so ``.to(torch.bfloat16)`` is exact.

    Done on the bits: ``torch.compile`` may drop a ``.to(bfloat16).float()`` round trip inside a graph
    (and Triton's interpreter truncates), while the quantisation must use the min/max it stores.

    Example::

        >>> round_to_bf16(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8]))  # ties: to even
        tensor([1.0000, 1.0156])
    """
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).view(torch.float32)


def quantize_4bit(x: Tensor, bucket: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-bucket 4-bit codes of ``x`` (1-D, fp32), packed two per byte, and each bucket's min/max.

    ``lo, hi = bf16(min_q x), bf16(max_q x)``;
    ``code = clamp(floor((x - lo) / ((hi - lo) / 15) + 1/2), 0, 15)``, 0 where ``hi == lo``.

    Example::

        >>> packed, lo, hi = quantize_4bit(torch.tensor([0.0, 1.0, 0.6, 0.2]), bucket=4)
        >>> packed.tolist(), lo.item(), hi.item()  # codes 0, 15, 9, 3
        ([240, 57], 0.0, 1.0)
    """
    numel = x.numel()
    buckets = _bucketed(x, bucket)
    lo_f = round_to_bf16(buckets.amin(dim=1, keepdim=True))
    hi_f = round_to_bf16(buckets.amax(dim=1, keepdim=True))
    scale = (hi_f - lo_f) / QUANT_LEVELS
    nonzero = scale > 0
    q = torch.where(nonzero, (buckets - lo_f) / torch.where(nonzero, scale, 1.0), 0.0)
    codes = (q + 0.5).clamp(0.0, QUANT_LEVELS + 0.5).to(torch.uint8).view(-1)
    codes[numel:] = 0  # the padding (an even number of codes: ``bucket`` is even)
    pairs = codes.view(-1, 2)[: (numel + 1) // 2]
    return pairs[:, 0] | (pairs[:, 1] << 4), lo_f.view(-1).to(torch.bfloat16), hi_f.view(-1).to(torch.bfloat16)


def dequantize_4bit(packed: Tensor, lo: Tensor, hi: Tensor, numel: int, bucket: int) -> Tensor:
    r"""The fp32 values of :func:`quantize_4bit`'s output: ``lo + code * (hi - lo) / 15`` per bucket.

    Example::

        >>> dequantize_4bit(*quantize_4bit(torch.tensor([0.0, 1.0, 0.6, 0.25]), 4), numel=4, bucket=4)
        tensor([0.0000, 1.0000, 0.6000, 0.2667])
    """
    codes = torch.stack((packed & 15, packed >> 4), dim=1).view(-1)
    codes = F.pad(codes, (0, lo.numel() * bucket - codes.numel())).view(-1, bucket).float()
    lo_f, hi_f = lo.float().unsqueeze(1), hi.float().unsqueeze(1)
    scale = (hi_f - lo_f) / QUANT_LEVELS
    return (lo_f + codes * scale).view(-1)[:numel]


def dequantize_add(grad: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> Tensor:
    """Step 1, ``a = g + deq(e)``: a new fp32 tensor of ``grad``'s (flat) length."""
    return grad.float() + dequantize_4bit(error, error_min, error_max, layout.numel, layout.quant_bucket)


def quantize_into_(residual: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> None:
    """Step 4: quantise ``residual`` (fp32, flat) into the error-feedback state, in place."""
    packed, lo, hi = quantize_4bit(residual, layout.quant_bucket)
    error.copy_(packed)
    error_min.copy_(lo)
    error_max.copy_(hi)


# ---- top-k window ---------------------------------------------------------------------------------


def block_topk(a: Tensor, layout: MicroAdamLayout) -> tuple[Tensor, Tensor]:
    """Step 2: per block, the ``k`` coordinates of largest ``|a|``: indices relative to the block, values.

    Returns ``(indices int64 [K], values [K])`` with ``K = layout.topk_per_row``; the full blocks
    come first (``k`` each), then the last block (``k_last``). Two ``topk`` calls, no loop.

    Example::

        >>> block_topk(torch.tensor([0.1, -3.0, 2.0, 0.0, 5.0]), micro_adam_layout(5, block_size=4, density=0.25))
        (tensor([1, 0]), tensor([-3.,  5.]))
    """
    split = layout.full_blocks * layout.block_size
    indices, values = [], []
    if layout.full_blocks:
        blocks = a[:split].view(layout.full_blocks, layout.block_size)
        idx = blocks.abs().topk(layout.k, dim=1, sorted=False).indices
        indices.append(idx.view(-1))
        values.append(blocks.gather(1, idx).view(-1))
    if layout.k_last:
        tail = a[split:]
        idx = tail.abs().topk(layout.k_last, sorted=False).indices
        indices.append(idx)
        values.append(tail.gather(0, idx))
    if len(indices) == 1:
        return indices[0], values[0]
    return torch.cat(indices), torch.cat(values)


def block_offsets(layout: MicroAdamLayout, device: torch.device) -> Tensor:
    """For each column of a window row, the flat index where its block starts (int64 ``[K]``)."""
    # repeat_interleave, not ``column // k``: Inductor's CPU code for int64 floor division by a
    # constant returns garbage past the first vector (torch 2.13)
    full = torch.arange(layout.full_blocks, device=device).repeat_interleave(layout.k)
    last = torch.full((layout.k_last,), layout.full_blocks, dtype=torch.int64, device=device)
    return torch.cat((full, last)) * layout.block_size


def window_ages(step: Tensor | float, window: int, device: torch.device) -> Tensor:
    """Age of each ring row at step ``step`` (0 = written this step), ``window`` for unwritten rows.

    Step ``t`` (from 1) writes row ``(t - 1) mod window``.

    Example::

        >>> window_ages(2.0, 4, torch.device("cpu")), window_ages(6.0, 4, torch.device("cpu"))
        (tensor([1, 0, 4, 4]), tensor([1, 0, 3, 2]))
    """
    t = torch.as_tensor(step, device=device).to(torch.int64)
    ages = (t - 1 - torch.arange(window, device=device)) % window
    return torch.where(ages < t, ages, window)


def window_weights(ages: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    r"""``(beta1**age, beta2**age)`` per ring row (fp32), 0 for unwritten rows (age ``window``)."""
    written = ages < ages.numel()
    age = ages.float()
    return torch.where(written, beta1**age, 0.0), torch.where(written, beta2**age, 0.0)


def bias_factors(step: Tensor | float, beta1: float, beta2: float) -> tuple[Tensor | float, Tensor | float]:
    r""":math:`c_1 = (1-\beta_1)/(1-\beta_1^t)`, :math:`c_2 = (1-\beta_2)/(1-\beta_2^t)`.

    They turn the window's exponential sums into AdamW's bias-corrected moments: with the same
    gradient in every row, :math:`c_1 M = g` and :math:`c_2 S = g^2` for :math:`t \le m`.
    """
    return (1 - beta1) / (1 - beta1**step), (1 - beta2) / (1 - beta2**step)


def window_update(
    window_indices: Tensor,
    window_values: Tensor,
    weights1: Tensor,
    weights2: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
    eps: float,
    layout: MicroAdamLayout,
) -> Tensor:
    r"""Step 6: the dense update :math:`u = c_1 M / (\sqrt{c_2 S} + \epsilon)` (fp32, flat).

    :math:`M = \sum_r w^{(1)}_r V_r` and :math:`S = \sum_r w^{(2)}_r V_r^2`, each row scattered to
    its coordinates (rows with weight 0 add nothing); :math:`u = 0` where the denominator is 0.

    Example::

        >>> layout = micro_adam_layout(4, block_size=4, density=0.25)
        >>> window_update(torch.tensor([[2], [2]], dtype=torch.int16), torch.tensor([[3.0], [3.0]]),
        ...               torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5]), 1 / 1.5, 1 / 1.5, 0.0, layout)
        tensor([0., 0., 1., 0.])
    """
    flat = (window_indices.long() + block_offsets(layout, window_indices.device)).view(-1)
    values = window_values.float()
    exp_sum = torch.zeros(layout.numel, dtype=torch.float32, device=values.device)
    exp_sum.index_add_(0, flat, (values * weights1.unsqueeze(1)).view(-1))
    sq_sum = torch.zeros_like(exp_sum).index_add_(0, flat, (values * values * weights2.unsqueeze(1)).view(-1))
    denom = (sq_sum * c2).sqrt() + eps
    nonzero = denom > 0
    return torch.where(nonzero, (exp_sum * c1) / torch.where(nonzero, denom, 1.0), 0.0)


def apply_window_update_(
    param_flat: Tensor,
    window_indices: Tensor,
    window_values: Tensor,
    ages: Tensor,
    weights1: Tensor,
    weights2: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
    eps: float,
    lr: Tensor | float,
    layout: MicroAdamLayout,
) -> None:
    """Steps 6-7: ``param_flat -= lr * u`` in fp32, rounded once to the parameter's dtype.

    ``ages`` is unused here (the weights already zero unwritten rows); the Triton twin needs it.
    """
    update = window_update(window_indices, window_values, weights1, weights2, c1, c2, eps, layout)
    param_flat.sub_(update.mul_(lr))


# ---- the update ----------------------------------------------------------------------------------


class _HotParts(NamedTuple):
    """The three steps a backend may replace; everything else is shared."""

    dequantize_add: Callable[..., Tensor]
    quantize_into_: Callable[..., None]
    apply_window_update_: Callable[..., None]


_TORCH_PARTS = _HotParts(dequantize_add, quantize_into_, apply_window_update_)


def _update(
    parts: _HotParts,
    param: Tensor,
    grad: Tensor,
    window_indices: Tensor,
    window_values: Tensor,
    error: Tensor,
    error_min: Tensor,
    error_max: Tensor,
    step: Tensor | float,
    layout: MicroAdamLayout,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    device = param.device
    window = window_indices.shape[0]
    g = grad.reshape(-1)
    if maximize:
        g = -g
    a = parts.dequantize_add(g, error, error_min, error_max, layout)  # 1.
    rel, values = block_topk(a, layout)  # 2.
    ages = window_ages(step, window, device)
    row = _newest_row(step, window, device)
    window_indices.index_copy_(0, row, rel.to(torch.int16).unsqueeze(0))
    window_values.index_copy_(0, row, round_to_bf16(values).to(torch.bfloat16).unsqueeze(0))
    a.index_fill_(0, rel + block_offsets(layout, device), 0.0)  # 3.
    parts.quantize_into_(a, error, error_min, error_max, layout)  # 4.

    flat = param.view(-1) if param.is_contiguous() else param.reshape(-1).clone()
    if weight_decay != 0:  # 5.
        flat.mul_(1 - lr * weight_decay)
    weights1, weights2 = window_weights(ages, beta1, beta2)
    c1, c2 = bias_factors(step, beta1, beta2)
    parts.apply_window_update_(  # 6.-7.
        flat, window_indices, window_values, ages, weights1, weights2, c1, c2, eps, lr, layout
    )
    if not param.is_contiguous():
        param.copy_(flat.view_as(param))


def _newest_row(step: Tensor | float, window: int, device: torch.device) -> Tensor:
    """The ring row step ``step`` writes, ``(step - 1) mod window``, as a 1-element int64 tensor."""
    return ((torch.as_tensor(step, device=device).to(torch.int64) - 1) % window).view(1)


def micro_adam_update_(
    param: Tensor,
    grad: Tensor,
    window_indices: Tensor,
    window_values: Tensor,
    error: Tensor,
    error_min: Tensor,
    error_max: Tensor,
    step: Tensor | float,
    *,
    layout: MicroAdamLayout,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """One in-place MicroAdam step of one tensor, pure PyTorch (``step`` already counts this step).

    ``window_indices`` (int16 ``[m, K]``), ``window_values`` (bf16 ``[m, K]``), ``error`` (uint8
    ``[ceil(d/2)]``), ``error_min``/``error_max`` (bf16 ``[buckets]``) are updated in place, as is
    ``param`` (fp32 or bf16; the update is computed in fp32). ``lr`` and ``step`` may be Python
    numbers or 0-dim tensors (the compiled path passes tensors so nothing recompiles).
    """
    _update(_TORCH_PARTS, param, grad, window_indices, window_values, error, error_min, error_max, step,
            layout, lr, beta1, beta2, eps, weight_decay, maximize)


def micro_adam_update_triton_(
    param: Tensor,
    grad: Tensor,
    window_indices: Tensor,
    window_values: Tensor,
    error: Tensor,
    error_min: Tensor,
    error_max: Tensor,
    step: Tensor | float,
    *,
    layout: MicroAdamLayout,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """:func:`micro_adam_update_` with its hot parts as Triton kernels (same signature and result).

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels
    were first imported. The top-k itself stays ``torch.topk``.
    """
    from lightning_lowmem.kernels import micro_adam_triton as kernels

    parts = _HotParts(kernels.dequantize_add, kernels.quantize_into_, kernels.apply_window_update_)
    _update(parts, param, grad, window_indices, window_values, error, error_min, error_max, step,
            layout, lr, beta1, beta2, eps, weight_decay, maximize)


def micro_adam(
    params: list[Tensor],
    grads: list[Tensor],
    window_indices: list[Tensor],
    window_values: list[Tensor],
    errors: list[Tensor],
    error_mins: list[Tensor],
    error_maxs: list[Tensor],
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
    """Functional API: one MicroAdam step over lists of tensors (increments ``state_steps``).

    Args:
        backend: ``"torch"`` (eager reference), ``"compile"`` (``torch.compile`` of it),
            ``"triton"`` (the kernels) or ``"auto"`` (Triton for CUDA tensors when it imports,
            else compile where supported, else eager); see :mod:`lightning_lowmem.kernels.dispatch`.
    """
    for i, param in enumerate(params):
        update, wants_tensors = resolve_update(
            micro_adam_update_, backend, triton=micro_adam_update_triton_, device=param.device
        )
        step = state_steps[i]
        step += 1
        if wants_tensors:
            lr_arg: Tensor | float = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
            step_arg: Tensor | float = step
        else:
            lr_arg = lr.item() if isinstance(lr, Tensor) else lr
            step_arg = step.item()
        update(
            param,
            grads[i],
            window_indices[i],
            window_values[i],
            errors[i],
            error_mins[i],
            error_maxs[i],
            step_arg,
            layout=layouts[i],
            lr=lr_arg,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
        )
