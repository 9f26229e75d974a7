r"""How MicroAdam lays out a tensor and its compressed state.

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

The state of a ``rows x cols`` tensor (:func:`init_state`):

* ``window``: the ring buffer of the last :math:`m` sparse gradients, int32 ``[rows, m, K]``
  (``K`` = entries of one row: ``k`` per block; the entry format is in
  :mod:`lightning_lowmem.kernels.micro_adam_packing`);
* the error feedback :math:`e`: uint8 ``[rows, ceil(cols/2)]``, one 4-bit code per coordinate,
  two per byte, with a bf16 min and max per bucket, ``[rows, ceil(cols/quant_bucket)]`` each
  (:mod:`lightning_lowmem.kernels.micro_adam_error_feedback`); absent without error feedback.

State per coordinate: :math:`\lceil\text{cols}/2\rceil/\text{cols} + 4\,\text{buckets}/\text{cols}
+ 4 m K/\text{cols}`, about :math:`0.5 + 4/\text{bucket} + 4 m\,\text{density}` (0.96 to 0.98 for
the matrices of GPT-2 small at the defaults: :math:`m = 10`, 1% per block, bucket 64), against 8
for fp32 AdamW (:meth:`MicroAdamLayout.state_bytes`).

Example::

    >>> layout = micro_adam_layout(16, 1000, block_size=256, density=0.02, quant_bucket=64)
    >>> [tuple(t.shape) for t in init_state(torch.zeros(16, 1000), layout, window=4)]
    [(16, 4, 20), (16, 500), (16, 16), (16, 16)]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

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
