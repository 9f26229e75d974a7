r"""How the momentum ``m`` of AdamMini/Eve is stored: fp32, bf16, or blockwise int8/int4 codes.

A :class:`MomentumFormat` names a storage format and, for the integer ones, the size of the
quantization blocks. Blocks are runs of consecutive entries of ONE storage row (dim 0 against the
rest, :func:`~lightning_lowmem.kernels.layout.as_rows`), so an FSDP2 shard of dim 0 never cuts a
block; the last block of a row may be shorter. Each block keeps one fp32 scale :math:`s_b`:

* ``"int8"``: linear, :math:`m = s_b\,q` with :math:`q \in \{-127..127\}` (int8 codes),
  :math:`s_b = \max_{i\in b}|m_i| / 127`, round to nearest (:math:`q = \lfloor m/s_b + 127.5\rfloor - 127`);
* ``"int4"``: the code book :data:`INT4_CODE_BOOK` of the 15 levels :math:`k/7`,
  :math:`k \in \{-7..7\}`, :math:`m = s_b\,c[q]` with :math:`s_b = \max_{i\in b}|m_i|`, nearest
  code; two codes a byte (even column in the low nibble);
* ``"bf16"``: bf16 values written with stochastic rounding (:func:`stochastic_round_bf16`), so
  that updates smaller than half a bf16 step are kept on average.

:func:`encode_` and :func:`decode` are the reference (de)quantization every backend reproduces;
:func:`random_bits` is the counter-based hash behind stochastic rounding (the same bits in PyTorch,
C and Triton for a ``seed`` and an entry's index).

Example::

    >>> fmt = MomentumFormat.of("int8", block=128)
    >>> m = torch.randn(4, 300)
    >>> state = fmt.new_state(m.shape, m.device)
    >>> encode_(state, m, fmt)
    >>> (decode(state, fmt, m.shape) - m).abs().max() <= state.scales.max() / 2 + 1e-7
    tensor(True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_lowmem.kernels.layout import as_rows

#: the names of ``exp_avg_dtype``, in decreasing size.
MOMENTUM_DTYPES = ("fp32", "bf16", "int8", "int4")
#: the default quantization block of the integer formats (entries of one row per fp32 scale).
DEFAULT_BLOCK = 128

#: int4 code book: the 15 levels k/7 of the block's absmax, k = -7..7 (code 7 is 0). A non-uniform
#: book dense near 0 (as torchao's and bitsandbytes' momentum maps) converged worse in the
#: measurements of docs/optimizers.md. The kernels take any sorted symmetric book.
INT4_CODE_BOOK = tuple(k / 7 for k in range(-7, 8))
#: the non-uniform int4 book the linear one was measured against (``benchmarks/convergence.py``,
#: ``benchmarks/momentum_formats.py``); no backend uses it.
NON_UNIFORM_INT4_CODE_BOOK = (-1.0, -0.7, -0.45, -0.27, -0.15, -0.075, -0.03, 0.0, 0.03, 0.075, 0.15, 0.27, 0.45, 0.7, 1.0)
#: midpoints between consecutive int4 code book values: a code is the count of midpoints below the value.
INT4_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(INT4_CODE_BOOK, INT4_CODE_BOOK[1:]))
INT8_MAX = 127.0

_MASK32 = 0xFFFFFFFF
#: odd multipliers below 2**31, so that the hash is exact in int64 PyTorch arithmetic
HASH_MUL1, HASH_MUL2, HASH_MUL3 = 0x2C1B3C6D, 0x297A2D39, 0x1B873593


class QuantizedMomentum(NamedTuple):
    """The stored momentum of one tensor: ``codes`` and, for int8/int4, one fp32 scale per block
    (``[rows, ceil(cols / block)]``); ``scales`` is ``None`` for fp32 and bf16."""

    codes: Tensor
    scales: Tensor | None = None


class MomentumFormat(NamedTuple):
    """A momentum storage format: ``name`` in :data:`MOMENTUM_DTYPES`, ``block`` entries per scale."""

    name: str = "fp32"
    block: int = DEFAULT_BLOCK

    @classmethod
    def of(cls, name: str, block: int = DEFAULT_BLOCK) -> MomentumFormat:
        """A checked format.

        Raises:
            ValueError: an unknown ``name``, a ``block`` below 2, or an odd ``block`` for int4.
        """
        if name not in MOMENTUM_DTYPES:
            raise ValueError(f"Invalid exp_avg_dtype: {name!r}; choose one of {', '.join(map(repr, MOMENTUM_DTYPES))}.")
        if isinstance(block, bool) or not isinstance(block, int) or not 2 <= block:
            raise ValueError(f"Invalid exp_avg_block: {block!r} (must be an integer >= 2).")
        if name == "int4" and block % 2:
            raise ValueError(f"Invalid exp_avg_block for int4: {block} (must be even: two 4-bit codes share a byte).")
        return cls(name, block)

    @property
    def quantized(self) -> bool:
        """Whether the format keeps integer codes and per-block scales."""
        return self.name in ("int8", "int4")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored codes or values."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[self.name]

    def applies_to(self, param: Tensor) -> bool:
        """Whether ``param``'s momentum takes this format: the integer formats need 2-D rows
        (tensors of fewer dims, biases and norms, keep fp32 momentum)."""
        return not self.quantized or param.dim() >= 2

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """``(codes shape, scales shape or None)`` of a parameter of ``shape``."""
        if not self.quantized:
            return tuple(shape), None
        rows = shape[0]
        cols = math.prod(shape[1:])
        blocks = -(-cols // self.block)
        codes = tuple(shape) if self.name == "int8" else (rows, -(-cols // 2))
        return codes, (rows, blocks)

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the stored momentum of a parameter of ``shape`` (codes and scales)."""
        codes, scales = self.state_shapes(shape)
        size = torch.empty((), dtype=self.dtype).element_size()
        return math.prod(codes) * size + (4 * math.prod(scales) if scales is not None else 0)

    def new_state(self, shape: tuple[int, ...], device: torch.device | str) -> QuantizedMomentum:
        """A zero momentum of a parameter of ``shape`` (all codes decode to 0)."""
        codes, scales = self.state_shapes(shape)
        zero_code = 7 | (7 << 4) if self.name == "int4" else 0  # the code of 0.0 in both nibbles
        return QuantizedMomentum(
            torch.full(codes, zero_code, dtype=self.dtype, device=device),
            torch.zeros(scales, dtype=torch.float32, device=device) if scales is not None else None,
        )


def random_bits(seed: int | Tensor, index: Tensor | int) -> Tensor | int:
    """32 pseudo-random bits per entry of the int64 ``index`` (or of an int), a hash of ``(seed, index mod 2**32)``.

    Counter-based, so every backend draws the same bits for an entry, whatever the order. ``seed``
    may be a 0-dim int64 tensor (the compiled update passes one, so that a new seed does not recompile).
    """
    h = ((index & _MASK32) * HASH_MUL1 + (seed & _MASK32)) & _MASK32
    h = ((h ^ (h >> 16)) * HASH_MUL2) & _MASK32
    h = ((h ^ (h >> 15)) * HASH_MUL3) & _MASK32
    return h ^ (h >> 16)


def step_seed(tensor_seed: int, step: float) -> int:
    """The 32-bit seed of a tensor's stochastic rounding at ``step``: a new stream every step."""
    return random_bits(tensor_seed, int(step))


def stochastic_round_bf16(x: Tensor, seed: int | Tensor, index_base: int | Tensor = 0) -> Tensor:
    r"""fp32 ``x`` rounded to bf16 up or down at random, :math:`E[\mathrm{round}(x)] = x`.

    Adds 16 random bits below the bf16 mantissa and truncates; non-finite values are kept. The bits
    of the entry at flat index :math:`j` of ``x`` are :func:`random_bits` of
    :math:`(\mathrm{seed},\ \mathrm{index\_base} + j)`: with ``index_base`` the flat index of
    ``x``'s first entry in the whole tensor (an FSDP2 shard's dim-0 offset times the entries per
    dim-0 slice), a shard rounds exactly as the whole tensor would in one process. ``index_base``
    may be a 0-dim int64 tensor (as the compiled update passes it).
    """
    flat = x.reshape(-1).to(torch.float32)
    noise = random_bits(seed, torch.arange(flat.numel(), device=x.device) + index_base) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64)
    rounded = ((bits + noise) & ~0xFFFF).to(torch.int32).view(torch.float32)  # int64: no overflow into the sign
    rounded = torch.where(torch.isfinite(flat), rounded, flat)
    return rounded.view(x.shape).to(torch.bfloat16)


def decode(state: QuantizedMomentum, fmt: MomentumFormat, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The fp32 momentum of ``shape`` that ``state`` holds."""
    if not fmt.quantized:
        return state.codes.to(torch.float32)
    rows = state.codes.shape[0]
    cols = math.prod(shape[1:])
    if fmt.name == "int8":
        values = as_rows(state.codes).to(torch.float32)
    else:
        book = torch.tensor(INT4_CODE_BOOK + (0.0,), dtype=torch.float32, device=state.codes.device)
        codes = torch.stack((state.codes & 0xF, state.codes >> 4), dim=-1).view(rows, -1)[:, :cols]
        values = book[codes.long()]
    scales = state.scales.repeat_interleave(fmt.block, dim=1)[:, :cols]
    return (values * scales).view(shape)


def encode_(state: QuantizedMomentum, m: Tensor, fmt: MomentumFormat, seed: int | Tensor = 0,
            index_base: int | Tensor = 0) -> None:
    """Write fp32 ``m`` into ``state`` in place: new scales and codes (int8, int4), or bf16 values
    with stochastic rounding (``seed``; entry :math:`j` of ``m`` draws the bits of the global index
    ``index_base + j``, see :func:`stochastic_round_bf16`), or a copy (fp32)."""
    if fmt.name == "fp32":
        state.codes.copy_(m)
        return
    if fmt.name == "bf16":
        state.codes.copy_(stochastic_round_bf16(m, seed, index_base))
        return
    rows = as_rows(m)
    n_rows, cols = rows.shape
    blocks = state.scales.shape[1]
    padded = torch.zeros(n_rows, blocks * fmt.block, dtype=torch.float32, device=m.device)
    padded[:, :cols] = rows
    padded = padded.view(n_rows, blocks, fmt.block)
    absmax = padded.abs().amax(dim=2)
    if fmt.name == "int8":
        inverse = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))
        # floor(y + 0.5) as the kernels compute it: truncation of a positive value, floor(y + 127.5) - 127
        codes = (torch.floor(padded * inverse.unsqueeze(2) + 127.5) - 127).view(n_rows, -1)[:, :cols]
        as_rows(state.codes).copy_(codes.to(torch.int8))
        state.scales.copy_(absmax / INT8_MAX)
        return
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    mids = torch.tensor(INT4_MIDPOINTS, dtype=torch.float32, device=m.device)
    codes = torch.bucketize(padded * inverse.unsqueeze(2), mids).view(n_rows, -1)[:, :cols]
    if cols % 2:
        codes = torch.cat((codes, codes.new_full((n_rows, 1), 7)), dim=1)
    pairs = codes.view(n_rows, -1, 2)
    state.codes.copy_((pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8))
    state.scales.copy_(absmax)
