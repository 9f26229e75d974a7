"""A compact Llama (Touvron et al., 2023) language model: RMSNorm, rotary positions, grouped-query
attention and a SwiGLU MLP, with Hugging Face's parameter names.

Parameter names follow ``transformers``' ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.gate_proj``, ``model.norm``,
``lm_head``), so the block partitioner recognises every weight from the structure (separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` under an attention module that exposes ``num_heads``,
``num_key_value_heads`` and ``head_dim``), parameter counts equal the published ones, and a Hugging
Face state dict loads with ``load_state_dict``. Mistral-style models are the same architecture.

Example::

    >>> model = Llama(LlamaConfig.tiny())
    >>> logits, loss = model(idx, targets)        # idx, targets: [batch, time] int64

    >>> with torch.device("meta"):                # shapes only: no memory, no initialisation
    ...     big = Llama(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    ...                             num_hidden_layers=32, num_attention_heads=32))
    >>> big.num_params()
    6738415616
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class LlamaConfig:
    """Shape of a :class:`Llama` (field names as in Hugging Face's ``LlamaConfig``).

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: query heads per layer.
        num_key_value_heads: key/value heads (grouped-query attention); ``None`` means
            ``num_attention_heads`` (plain multi-head attention). Must divide ``num_attention_heads``.
        head_dim: rows per head of the Q/K/V projections; ``None`` means
            ``hidden_size // num_attention_heads``. May differ from it (e.g. Mistral-Nemo).
        rms_norm_eps: epsilon of the RMS norms.
        tie_word_embeddings: share the output head's weight with the token embedding.
        max_position_embeddings: the longest sequence :meth:`Llama.forward` accepts.
        rope_theta: base of the rotary position frequencies.
        attention_bias: biases on ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``.
        mlp_bias: biases on ``gate_proj``, ``up_proj`` and ``down_proj``.

    ``num_key_value_heads`` and ``head_dim`` are filled in at construction (as Hugging Face does), so
    ``dataclasses.replace(config, hidden_size=...)`` keeps the old ``head_dim``: pass it too.

    Raises:
        ValueError: naming the field, for a non-positive size, a head count that does not divide,
            or a head size that cannot be derived.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5  # Llama 2 and 3 (Hugging Face's class default is 1e-6)
    tie_word_embeddings: bool = False  # Llama 1-3 >= 7B untie; small models (Llama 3.2 1B) tie
    max_position_embeddings: int = 4096  # Llama 2's training context
    rope_theta: float = 10000.0  # Llama 2; Llama 3 uses 500000
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check_positive_int(field, getattr(self, field))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}): each key/value head serves a group of query heads."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); give head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}.")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}.")

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A 0.3M-parameter byte-level model (vocab 256) with grouped-query attention, for tests."""
        fields = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return cls(**{**fields, **overrides})


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LlamaConfig.{field} must be a positive int, got {value!r}.")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotary angles, ``[time, head_dim]`` (each frequency used twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., time, head_dim]``: the two halves of each head are a pair's coordinates."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions on Q and K."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, heads * head_dim] -> [B, heads, T, head_dim]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_key_value_heads != self.num_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward network: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """A pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The Llama architecture: token embedding, ``num_hidden_layers`` decoder layers, a final norm, a head.

    Weights are drawn from N(0, 0.02) (Hugging Face's ``initializer_range``), norms start at 1.
    Rotary angles are computed in each forward from the positions (no buffers), so a model built on
    the meta device needs nothing but ``to_empty`` and an initialisation to run.

    Args:
        config: the model's shape.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)]),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_output_embeddings(self) -> nn.Linear:
        """The output head (the convention the partitioner and ``transformers`` use to find it)."""
        return self.lm_head

    def num_params(self) -> int:
        """Number of parameters, a tied weight counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy against ``targets`` when given.

        Args:
            idx: token ids, ``[batch, time]`` with ``time <= max_position_embeddings``.
            targets: the next token at every position, same shape; ``-1`` positions are ignored.

        Returns:
            ``(logits [batch, time, vocab_size], loss or None)``.
        """
        _, T = idx.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"Cannot forward a sequence of length {T}: the model's max_position_embeddings is "
                f"{self.config.max_position_embeddings}. Crop the input or build the model with a larger "
                "LlamaConfig.max_position_embeddings."
            )
        x = self.model.embed_tokens(idx)
        positions = torch.arange(T, device=idx.device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
