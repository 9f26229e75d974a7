r"""MicroAdam's functional core: compressed gradient window, 4-bit error feedback, one pure update.

A parameter of two or more dims is viewed as ``rows x cols``: dim 0 against the other dims
flattened. Each row is cut into :math:`\lceil \text{cols} / \text{block\_size} \rceil` top-k blocks
of near-equal length (``block_len`` each, the row's last block shorter by fewer coordinates than
the row has blocks) and into quantisation buckets of ``quant_bucket`` (the row's last bucket may be
shorter). **No block and no bucket crosses a row.** FSDP2 shards a parameter on dim 0 in whole
rows, so a rank's shard holds whole blocks and whole buckets: every rank updates its rows alone,
with no communication, and every state tensor has the rows as its dim 0, so it is stored as a
``Shard(0)`` DTensor whose global shape does not depend on the world size. Near-equal blocks,
rather than full blocks plus a remainder, keep every block's density near ``density``: a row of
4097 gets two blocks of 2049 and 2048 instead of a block of one coordinate selected at every step.

The state of a ``rows x cols`` tensor:

* ``window``: the ring buffer of the last :math:`m` sparse gradients, int32 ``[rows, m, K]``
  (``K`` = entries of one row: ``k`` per block). Each entry is the selected value rounded to
  bfloat16, as the bits of that fp32 number (whose low 16 bits are then zero), with the
  coordinate's index relative to its block (``< 2**15``) in those low 16 bits: an int16 index and
  a bf16 value in 4 bytes. One int32 rather than an int16 and a bf16 tensor because neither gloo
  nor NCCL all-gathers int16, and gathering every state tensor is how a full (single-file)
  checkpoint of sharded state is written;
* the error feedback :math:`e`: uint8 ``[rows, ceil(cols/2)]``, one 4-bit code per coordinate,
  two per byte (column ``2i`` of a row in the low nibble, ``2i+1`` in the high one), with a
  bf16 min and max per bucket, ``[rows, ceil(cols/quant_bucket)]`` each.

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

Without error feedback (the three error tensors ``None``: :func:`init_state` with
``error_feedback=False``), step 1 is :math:`a = g` and steps 3-4 are skipped: top-k window Adam,
with :math:`0.5 + 4/\text{bucket}` bytes per coordinate less state.

State per coordinate: :math:`\lceil\text{cols}/2\rceil/\text{cols} + 4\,\text{buckets}/\text{cols}
+ 4 m K/\text{cols}`, about :math:`0.5 + 4/\text{bucket} + 4 m\,\text{density}` (0.96 to 0.98 for
the matrices of GPT-2 small at the defaults: :math:`m = 10`, 1% per block, bucket 64), against 8
for fp32 AdamW (:meth:`MicroAdamLayout.state_bytes`).

:func:`micro_adam_update_` is the reference (pure PyTorch, vectorised, runnable under
``torch.compile``); :func:`micro_adam_update_triton_` has the same signature and result and runs
the three hot parts (dequantise-and-add, min/max + quantise, window rebuild + apply) as Triton
kernels from :mod:`lightning_lowmem.kernels.micro_adam_triton`. :func:`micro_adam` is the
functional API over lists of tensors.

Example::

    >>> layout = micro_adam_layout(16, 1000, block_size=256, density=0.02, quant_bucket=64)
    >>> p, g = torch.randn(16, 1000), torch.randn(16, 1000)
    >>> state = init_state(p, layout, window=4)
    >>> micro_adam_update_(p, g, *state, 1.0, layout=layout, lr=1e-3, beta1=0.9, beta2=0.999,
    ...                    eps=1e-8, weight_decay=0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_lowmem.kernels.dispatch import resolve_update

#: Largest number of coordinates per top-k block. Fixed (not derived from the GPU's shared memory
#: as in the official code) so that a checkpoint means the same on every device. 4096 keeps
#: relative indices well inside int16, gives k = 41 at 1%, and keeps the ``window x k`` = 410
#: entries of one block within one Triton program's reach.
DEFAULT_BLOCK_SIZE = 4096
#: Largest block whose relative indices fit int16 (and the low 16 bits of a window entry).
MAX_BLOCK_SIZE = 32768
#: Highest 4-bit code: a bucket's range is cut into 15 steps.
QUANT_LEVELS = 15
#: The dtypes of the compressed state, in :func:`init_state`'s order.
STATE_DTYPES = {"window": torch.int32, "error": torch.uint8, "error_min": torch.bfloat16, "error_max": torch.bfloat16}
#: The error-feedback part of the state: absent when MicroAdam runs without error feedback.
ERROR_STATE = ("error", "error_min", "error_max")
#: Bits of a window entry holding the index (the rest hold the value rounded to bf16).
_INDEX_MASK = 0xFFFF
_VALUE_MASK = -65536  # 0xFFFF0000 as an int32


class MicroAdamLayout(NamedTuple):
    """How a tensor viewed as ``rows x cols`` is cut into top-k blocks and quantisation buckets.

    Every row is cut the same way and nothing crosses a row (see the module docstring), so the
    layout of a shard of whole rows is the same with fewer ``rows`` (:meth:`with_rows`).

    Args:
        rows: rows (dim 0) of the tensor, or of the shard held here.
        cols: coordinates per row (the other dims flattened).
        block_len: coordinates per top-k block; a row's last block holds the rest (``cols % block_len``
            coordinates when that is not 0).
        k: coordinates kept per block of ``block_len``.
        k_last: coordinates kept in the shorter last block of a row (0 when ``cols % block_len == 0``).
        quant_bucket: coordinates per min/max bucket of a row (its last bucket may be shorter).
    """

    rows: int
    cols: int
    block_len: int
    k: int
    k_last: int
    quant_bucket: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def full_blocks(self) -> int:
        """Blocks of exactly ``block_len`` coordinates in one row."""
        return self.cols // self.block_len

    @property
    def blocks_per_row(self) -> int:
        """Blocks of one row, the shorter last one included."""
        return -(-self.cols // self.block_len)

    @property
    def topk_per_row(self) -> int:
        """Window entries per row and ring slot (``K``): ``k`` per full block plus ``k_last``."""
        return self.full_blocks * self.k + self.k_last

    @property
    def buckets_per_row(self) -> int:
        """Quantisation buckets of one row (the last one may be shorter)."""
        return -(-self.cols // self.quant_bucket)

    @property
    def packed_per_row(self) -> int:
        """Bytes of one row's packed 4-bit error: two codes per byte."""
        return (self.cols + 1) // 2

    def with_rows(self, rows: int) -> MicroAdamLayout:
        """The layout of ``rows`` of these rows (a dim-0 shard)."""
        return self._replace(rows=rows)

    def state_shapes(self, window: int, error_feedback: bool = True) -> dict[str, tuple[int, ...]]:
        """Shape of each compressed state tensor (keys as :data:`STATE_DTYPES`); rows are dim 0.

        Without error feedback only ``window`` is kept (:data:`ERROR_STATE` is left out).
        """
        shapes = {"window": (self.rows, window, self.topk_per_row)}
        if error_feedback:
            buckets = (self.rows, self.buckets_per_row)
            shapes.update(error=(self.rows, self.packed_per_row), error_min=buckets, error_max=buckets)
        return shapes

    def state_bytes(self, window: int, error_feedback: bool = True) -> int:
        r"""Bytes of the compressed state of the tensor (``step`` excluded).

        Error feedback costs :math:`\lceil c/2 \rceil + 4\lceil c/\text{bucket} \rceil` bytes per row of
        :math:`c`, about :math:`0.5 + 4/\text{bucket}` per coordinate.

        Example::

            >>> micro_adam_layout(768, 3072).state_bytes(10) / (768 * 3072)  # k = 31 of 3072 per row
            0.966145833...
            >>> micro_adam_layout(768, 3072).state_bytes(10, error_feedback=False) / (768 * 3072)
            0.403645833...
        """
        per_row = window * self.topk_per_row * 4
        if error_feedback:
            per_row += self.packed_per_row + 2 * 2 * self.buckets_per_row
        return self.rows * per_row


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
    rows: int, cols: int, *, block_size: int = DEFAULT_BLOCK_SIZE, density: float = 0.01, quant_bucket: int = 64
) -> MicroAdamLayout:
    """The :class:`MicroAdamLayout` of a ``rows x cols`` tensor: blocks of at most ``block_size``.

    A row is cut into ``ceil(cols / block_size)`` blocks of ``ceil(cols / blocks)`` coordinates, the
    last one holding the rest.

    Example::

        >>> micro_adam_layout(2, 4097)  # two blocks of 2049 and 2048 per row, 21 kept in each
        MicroAdamLayout(rows=2, cols=4097, block_len=2049, k=21, k_last=21, quant_bucket=64)
        >>> micro_adam_layout(3, 768)   # one block per row
        MicroAdamLayout(rows=3, cols=768, block_len=768, k=8, k_last=0, quant_bucket=64)
    """
    check_micro_adam_hparams(1, density, block_size, quant_bucket)
    if rows < 0 or cols < 1:
        raise ValueError(f"Cannot lay out a tensor of {rows} rows of {cols} coordinates (need rows >= 0, cols >= 1).")
    blocks = -(-cols // block_size)
    block_len = -(-cols // blocks)
    tail = cols % block_len
    return MicroAdamLayout(
        rows=rows,
        cols=cols,
        block_len=block_len,
        k=topk_count(block_len, density),
        k_last=topk_count(tail, density) if tail else 0,
        quant_bucket=quant_bucket,
    )


def init_state(
    param: Tensor, layout: MicroAdamLayout, window: int, *, error_feedback: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Zero state ``(window, error, error_min, error_max)`` on ``param``'s device (:data:`STATE_DTYPES`).

    An empty window holds only weight-0 slots; a zero error (codes 0, min = max = 0) dequantises
    to exactly 0. Without error feedback the three error tensors are ``None`` (nothing allocated),
    which :func:`micro_adam_update_` reads as "no error feedback".

    Example::

        >>> layout = micro_adam_layout(2, 100, density=0.05)
        >>> [None if t is None else tuple(t.shape) for t in init_state(torch.zeros(2, 100), layout, 4)]
        [(2, 4, 5), (2, 50), (2, 2), (2, 2)]
        >>> init_state(torch.zeros(2, 100), layout, 4, error_feedback=False)[1:]
        (None, None, None)
    """
    shapes = layout.state_shapes(window, error_feedback)
    return tuple(
        torch.zeros(shapes[key], dtype=dtype, device=param.device) if key in shapes else None
        for key, dtype in STATE_DTYPES.items()
    )


# ---- window entries -------------------------------------------------------------------------------


def pack_window_entries(indices: Tensor, values: Tensor) -> Tensor:
    """int32 window entries: ``values`` rounded to bf16 (as fp32 bits) with ``indices`` in the low 16 bits.

    Example::

        >>> entries = pack_window_entries(torch.tensor([5, 0]), torch.tensor([-1.5, 3.0]))
        >>> unpack_window_entries(entries)
        (tensor([5, 0], dtype=torch.int32), tensor([-1.5000,  3.0000]))
    """
    return round_to_bf16(values.float()).view(torch.int32) | indices.to(torch.int32)


def unpack_window_entries(entries: Tensor) -> tuple[Tensor, Tensor]:
    """``(indices int32, values fp32)`` of :func:`pack_window_entries`'s output (the values exactly bf16)."""
    return entries & _INDEX_MASK, (entries & _VALUE_MASK).view(torch.float32)


# ---- 4-bit error feedback ------------------------------------------------------------------------


def _row_buckets(x: Tensor, bucket: int) -> list[Tensor]:
    """``x`` (``rows x cols``) as ``[rows, buckets, bucket]`` of its whole buckets, then ``[rows, 1, rest]``
    for each row's shorter last bucket if there is one.

    Split rather than padded: Inductor (torch 2.13, CPU) miscompiles padding each row with copies of
    its last value when the padded tensor is fused with its producer (the padding reads garbage).
    """
    rows, cols = x.shape
    split = cols - cols % bucket
    parts = []
    if split:
        parts.append(x[:, :split].reshape(rows, split // bucket, bucket))
    if split < cols:
        parts.append(x[:, split:].unsqueeze(1))
    return parts


def _cat_columns(parts: list[Tensor]) -> Tensor:
    """``[rows, n_i, m_i]`` parts as one ``[rows, sum(n_i m_i)]`` tensor."""
    flat = [part.reshape(part.shape[0], -1) for part in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def round_to_bf16(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), still fp32, so ``.to(torch.bfloat16)`` is exact.

    Done on the bits: ``torch.compile`` may drop a ``.to(bfloat16).float()`` round trip inside a graph
    (and Triton's interpreter truncates), while the quantisation must use the min/max it stores.

    Example::

        >>> round_to_bf16(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8]))  # ties: to even
        tensor([1.0000, 1.0156])
    """
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & _VALUE_MASK).view(torch.float32)


def quantize_4bit(x: Tensor, bucket: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-bucket 4-bit codes of ``x`` (``rows x cols``, fp32), two per byte, and each bucket's min/max.

    Buckets are taken within each row (a row's last bucket may be shorter);
    ``lo, hi = bf16(min_q x), bf16(max_q x)``;
    ``code = clamp(floor((x - lo) / ((hi - lo) / 15) + 1/2), 0, 15)``, 0 where ``hi == lo``.
    Returns uint8 ``[rows, ceil(cols/2)]`` (an odd row's last byte holds one code) and bf16
    ``[rows, ceil(cols/bucket)]`` twice.

    Example::

        >>> packed, lo, hi = quantize_4bit(torch.tensor([[0.0, 1.0, 0.6, 0.2, 0.5]]), bucket=4)
        >>> packed.tolist(), lo.tolist(), hi.tolist()  # codes 0, 15, 9, 3 | 0 (one-element bucket)
        ([[240, 57, 0]], [[0.0, 0.5]], [[1.0, 0.5]])
    """
    codes, lows, highs = [], [], []
    for buckets in _row_buckets(x, bucket):
        lo_f = round_to_bf16(buckets.amin(dim=2, keepdim=True))
        hi_f = round_to_bf16(buckets.amax(dim=2, keepdim=True))
        scale = (hi_f - lo_f) / QUANT_LEVELS
        nonzero = scale > 0
        q = torch.where(nonzero, (buckets - lo_f) / torch.where(nonzero, scale, 1.0), 0.0)
        codes.append((q + 0.5).clamp(0.0, QUANT_LEVELS + 0.5).to(torch.uint8))
        lows.append(lo_f)
        highs.append(hi_f)
    code = _cat_columns(codes)
    cols = code.shape[1]
    even = cols - cols % 2
    packed = code[:, 0:even:2] | (code[:, 1:even:2] << 4)
    if even < cols:  # the row's last code alone in its byte
        packed = torch.cat((packed, code[:, even:]), dim=1)
    return packed, _cat_columns(lows).to(torch.bfloat16), _cat_columns(highs).to(torch.bfloat16)


def dequantize_4bit(packed: Tensor, lo: Tensor, hi: Tensor, cols: int, bucket: int) -> Tensor:
    r"""The fp32 ``rows x cols`` values of :func:`quantize_4bit`'s output: ``lo + code * (hi - lo) / 15``.

    Example::

        >>> dequantize_4bit(*quantize_4bit(torch.tensor([[0.0, 1.0, 0.6, 0.25]]), 4), cols=4, bucket=4)
        tensor([[0.0000, 1.0000, 0.6000, 0.2667]])
    """
    rows = packed.shape[0]
    codes = torch.stack((packed & 15, packed >> 4), dim=2).view(rows, -1)[:, :cols].float()
    lo_f, hi_f = lo.float().unsqueeze(2), hi.float().unsqueeze(2)
    scale = (hi_f - lo_f) / QUANT_LEVELS
    values, first = [], 0
    for part in _row_buckets(codes, bucket):
        n = part.shape[1]
        values.append(lo_f[:, first : first + n] + part * scale[:, first : first + n])
        first += n
    return _cat_columns(values)


def dequantize_add(grad: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> Tensor:
    """Step 1, ``a = g + deq(e)``: a new contiguous fp32 ``rows x cols`` tensor (``grad`` is ``rows x cols``)."""
    return grad.float() + dequantize_4bit(error, error_min, error_max, layout.cols, layout.quant_bucket)


def quantize_into_(residual: Tensor, error: Tensor, error_min: Tensor, error_max: Tensor, layout: MicroAdamLayout) -> None:
    """Step 4: quantise ``residual`` (fp32, ``rows x cols``) into the error-feedback state, in place."""
    packed, lo, hi = quantize_4bit(residual, layout.quant_bucket)
    error.copy_(packed)
    error_min.copy_(lo)
    error_max.copy_(hi)


# ---- top-k window ---------------------------------------------------------------------------------


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
    window: Tensor,
    error: Tensor | None,
    error_min: Tensor | None,
    error_max: Tensor | None,
    step: Tensor | float,
    layout: MicroAdamLayout,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if layout.rows == 0:  # a shard without rows (more ranks than rows)
        return
    device = param.device
    rows, cols = layout.rows, layout.cols
    g = grad.reshape(rows, cols)
    if maximize:
        g = -g
    feedback = has_error_feedback(error, error_min, error_max)
    if feedback:
        a = parts.dequantize_add(g, error, error_min, error_max, layout)  # 1.
    else:
        a = g.float()  # 1. without error feedback: a = g (only read, so it may be grad itself)
    rel, values = block_topk(a, layout)  # 2.
    ages = window_ages(step, window.shape[1], device)
    slot = _newest_slot(step, window.shape[1], device)
    window.index_copy_(1, slot, pack_window_entries(rel, values).unsqueeze(1))
    if feedback:
        a.scatter_(1, rel + block_offsets(layout, device), 0.0)  # 3.
        parts.quantize_into_(a, error, error_min, error_max, layout)  # 4.

    param_rows = param.view(rows, cols) if param.is_contiguous() else param.reshape(rows, cols).clone()
    if weight_decay != 0:  # 5.
        param_rows.mul_(1 - lr * weight_decay)
    weights1, weights2 = window_weights(ages, beta1, beta2)
    c1, c2 = bias_factors(step, beta1, beta2)
    parts.apply_window_update_(param_rows, window, ages, weights1, weights2, c1, c2, eps, lr, layout)  # 6.-7.
    if not param.is_contiguous():
        param.copy_(param_rows.view_as(param))


def has_error_feedback(error: Tensor | None, error_min: Tensor | None, error_max: Tensor | None) -> bool:
    """Whether a tensor's state carries error feedback: all three error tensors given, or none.

    Example::

        >>> has_error_feedback(None, None, None)
        False

    Raises:
        ValueError: if only some of them are ``None``.
    """
    given = [t is not None for t in (error, error_min, error_max)]
    if any(given) and not all(given):
        missing = [name for name, ok in zip(ERROR_STATE, given) if not ok]
        raise ValueError(
            f"MicroAdam's error state is incomplete: {missing} missing. Pass all of {list(ERROR_STATE)} "
            "(error feedback) or none of them (no error feedback)."
        )
    return all(given)


def _newest_slot(step: Tensor | float, window: int, device: torch.device) -> Tensor:
    """The ring slot step ``step`` writes, ``(step - 1) mod window``, as a 1-element int64 tensor."""
    return ((torch.as_tensor(step, device=device).to(torch.int64) - 1) % window).view(1)


def micro_adam_update_(
    param: Tensor,
    grad: Tensor,
    window: Tensor,
    error: Tensor | None,
    error_min: Tensor | None,
    error_max: Tensor | None,
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

    ``param`` (fp32 or bf16; the update is computed in fp32) and ``grad`` hold ``layout.rows``
    rows of ``layout.cols`` coordinates (any shape with that many elements, rows first). The
    state (:func:`init_state`: ``window`` int32 ``[rows, m, K]``, ``error`` uint8
    ``[rows, ceil(cols/2)]``, ``error_min``/``error_max`` bf16 ``[rows, buckets]``) is updated in
    place, as is ``param``. ``lr`` and ``step`` may be Python numbers or 0-dim tensors (the
    compiled path passes tensors so nothing recompiles).

    ``error``, ``error_min`` and ``error_max`` all ``None`` switch error feedback off: steps 1, 3
    and 4 become :math:`a = g` (top-k of the gradient itself; nothing is fed back).

    Example::

        >>> layout = micro_adam_layout(1, 4, block_size=4, density=0.25)
        >>> p = torch.zeros(1, 4)
        >>> window, *_ = init_state(p, layout, 2, error_feedback=False)
        >>> micro_adam_update_(p, torch.tensor([[0.5, -2.0, 1.0, 0.0]]), window, None, None, None, 1.0,
        ...                    layout=layout, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0)
        >>> p  # step 1: sign(g) on the k = 1 largest |g|
        tensor([[0.0000, 0.1000, 0.0000, 0.0000]])
    """
    _update(_TORCH_PARTS, param, grad, window, error, error_min, error_max, step,
            layout, lr, beta1, beta2, eps, weight_decay, maximize)


def micro_adam_update_triton_(
    param: Tensor,
    grad: Tensor,
    window: Tensor,
    error: Tensor | None,
    error_min: Tensor | None,
    error_max: Tensor | None,
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
    _update(parts, param, grad, window, error, error_min, error_max, step,
            layout, lr, beta1, beta2, eps, weight_decay, maximize)


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
    """Functional API: one MicroAdam step over lists of (local) tensors (increments ``state_steps``).

    Args:
        errors, error_mins, error_maxs: per tensor, its error-feedback state, or ``None`` (all three)
            for a tensor updated without error feedback.
        layouts: per tensor, the layout of the rows given (a shard's rows under FSDP2).
        backend: ``"torch"`` (eager reference), ``"compile"`` (``torch.compile`` of it),
            ``"triton"`` (the kernels) or ``"auto"`` (Triton for CUDA tensors when it imports,
            else compile where supported, else eager); see :mod:`lightning_lowmem.kernels.dispatch`.
    """
    for i, param in enumerate(params):
        step = state_steps[i]
        step += 1
        if layouts[i].rows == 0:
            continue
        update, wants_tensors = resolve_update(
            micro_adam_update_, backend, triton=micro_adam_update_triton_, device=param.device
        )
        if wants_tensors:
            lr_arg: Tensor | float = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
            step_arg: Tensor | float = step
        else:
            lr_arg = lr.item() if isinstance(lr, Tensor) else lr
            step_arg = step.item()
        update(
            param,
            grads[i],
            windows[i],
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
