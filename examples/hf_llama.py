"""AdamMini and Eve on Hugging Face ``transformers`` models: a small Llama (GQA) and a small GPT-2.

Both models are built from a config, with random weights: nothing is downloaded. For each, the
script prints the block plan, which shows that the partitioner reads the real architecture:

* Llama: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``; grouped-query attention (8 query
  heads, 2 key/value heads) and a ``head_dim`` of 32 that is not ``hidden_size / heads`` (= 16),
  both read from the model's config, so ``q_proj`` has 8 head blocks and ``k_proj`` 2;
* GPT-2: one fused ``c_attn`` projection in a ``Conv1D``, whose weight is stored transposed
  (``[in, out]``), split into its Q, K and V segments; the output head tied to ``wte`` (counted once).

Then it trains each model for a few steps with AdamMini and with Eve on one batch of random tokens
(the loss must fall: the model memorises the batch).

    pip install -e ".[hf]"             # transformers is an optional extra
    python examples/hf_llama.py        # about 20 seconds on a CPU
    python examples/hf_llama.py --steps 30
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from lightning_lowmem import AdamMini, Eve, build_plan
from lightning_lowmem.cli import collapse_layers

try:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
except ImportError as error:  # the one optional dependency of this example
    sys.exit(f"This example needs Hugging Face transformers ({error}). Install it with: pip install -e \".[hf]\"")

VOCAB, SEQ = 512, 32


def small_llama() -> nn.Module:
    """2 layers of width 128; 8 query heads and 2 key/value heads of head_dim 32 (GQA; 8 * 32 != 128)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def small_gpt2() -> nn.Module:
    """2 layers of width 128 and 4 heads; fused c_attn (Conv1D) and the output head tied to wte."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(config)


def print_plan(name: str, model: nn.Module) -> None:
    """The plan table, then every parameter (layers alike on one line): shape, role, blocks."""
    plan = build_plan(model, preset="adam_mini")
    print(f"=== {name}: {type(model).__name__}, {plan.num_params:,} parameters\n\n{plan.summary()}\n")
    rows = [("parameter", "shape", "role", "blocks")] + [tuple(line.split("  ", 3)) for line in collapse_layers(plan)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()


def train(make_model, make_optimizer, steps: int) -> list[float]:
    """Losses of ``steps`` steps on one fixed batch of random tokens, from seeded initial weights."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = make_optimizer(model)
    tokens = torch.randint(VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per model and optimizer")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (a first and a last loss), got {args.steps}")
    torch.set_num_threads(1)

    models = {"Llama (GQA)": small_llama, "GPT-2 (fused c_attn)": small_gpt2}
    for name, make_model in models.items():
        print_plan(name, make_model())

    optimizers = {
        # The model itself, not model.parameters(): its structure decides the blocks.
        "AdamMini": lambda model: AdamMini(model, lr=1e-3, weight_decay=0.1, backend="torch"),
        "Eve": lambda model: Eve(model, lr=1e-3, weight_decay=0.1, backend="torch"),
    }
    print(f"Training {args.steps} steps on one batch of random tokens (uniform guess: ln {VOCAB} = "
          f"{torch.tensor(float(VOCAB)).log():.3f}):")
    for name, make_model in models.items():
        for opt_name, make_optimizer in optimizers.items():
            losses = train(make_model, make_optimizer, args.steps)
            print(f"  {name:<22} {opt_name:<9} loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
