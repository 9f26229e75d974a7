"""A GPT language model in the style of nanoGPT (Karpathy), small enough to read in one sitting.

The layout and parameter names follow GPT-2 (``transformer.wte``, ``transformer.h.0.attn.c_attn``,
...), so the block partitioner recognises every parameter from the structure alone: the fused
``c_attn`` projection is split into Q, K and V heads using the attention module's ``n_head`` and
``head_dim``, and the output head tied to the token embedding is counted once.

Example::

    >>> model = GPT(GPTConfig.tiny())
    >>> logits, loss = model(idx, targets)       # idx, targets: [batch, time] int64

    >>> with torch.device("meta"):               # no memory, no initialisation: for planning
    ...     big = GPT(GPTConfig.gpt2_small())
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class GPTConfig:
    """Shape of a :class:`GPT`.

    Args:
        vocab_size: number of token ids.
        block_size: the longest sequence the model accepts (size of the position embedding).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: dropout probability in attention, after projections and on the embeddings.
        bias: biases in the Linear and LayerNorm layers.
        tie_weights: share the output head's weight with the token embedding.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0  # short runs and optimizer comparisons do not overfit; 0 keeps steps deterministic
    bias: bool = True  # as GPT-2; False is slightly better and faster (nanoGPT), but GPT-2 checkpoints have them
    tie_weights: bool = True  # as GPT-2: saves vocab_size * n_embd parameters and tends to train better

    def __post_init__(self) -> None:
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{field} must be a positive int, got {value!r}.")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. use n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    @classmethod
    def gpt2_small(cls, **overrides: Any) -> GPTConfig:
        """GPT-2 small (124M parameters): vocab 50257, 1024 positions, 12 layers, 12 heads, width 768."""
        return dataclasses.replace(
            cls(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), **overrides
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> GPTConfig:
        """A 0.8M-parameter byte-level model (vocab 256) that trains in a minute or two on a laptop CPU."""
        return dataclasses.replace(cls(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128), **overrides)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused Q/K/V projection (rows: Q, then K, then V)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: ``n_embd -> 4 * n_embd -> GELU -> n_embd``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT-2 architecture: token and position embeddings, ``n_layer`` blocks, a final norm, a head.

    Args:
        config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

        # GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write
        # into the residual stream scaled down by sqrt(2 * n_layer) (two per block).
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, a tied weight counted once; without the position embedding if asked."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy against ``targets`` when given.

        Args:
            idx: token ids, ``[batch, time]`` with ``time <= block_size``.
            targets: the next token at every position, same shape; ``-1`` positions are ignored.

        Returns:
            ``(logits [batch, time, vocab_size], loss or None)``.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {T}: the model's block_size is {self.config.block_size}. "
                "Crop the input or build the model with a larger GPTConfig.block_size."
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
