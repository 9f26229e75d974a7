"""How well each momentum format keeps AdamMini's momentum: the measurements behind the defaults.

Trains the example GPT (``GPTConfig.tiny()``, the corpus and recipe of ``benchmarks/convergence.py``)
with fp32 AdamMini for ``--steps`` steps, then quantizes the momentum ``m`` of every matrix with
each candidate and reports, over all of them, the relative error ``||Q(m) - m|| / ||m||``, the
share of non-zero entries flushed to 0, and the bytes per entry (codes and fp32 scales):

* ``int8`` linear (the package's) at blocks of 32 to 512 entries of a row;
* ``int4`` with the package's linear code book (:data:`INT4_CODE_BOOK`, levels ``k/7``) and with a
  non-uniform one dense near 0 (:data:`NON_UNIFORM_INT4_CODE_BOOK`), at
  blocks of 32 to 256;
* ``bf16`` (round to nearest; the optimizer rounds at random, whose error is larger per draw and
  unbiased).

Run::

    python benchmarks/momentum_formats.py --steps 200
"""

from __future__ import annotations

import argparse
import itertools

import torch

from lightning_lowmem.data import CharTextDataModule
from lightning_lowmem.kernels.momentum_formats import NON_UNIFORM_INT4_CODE_BOOK, MomentumFormat, decode, encode_
from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.optim import AdamMini


def momenta(steps: int) -> list[torch.Tensor]:
    """The fp32 momentum of every matrix of the example GPT after ``steps`` AdamMini steps."""
    torch.manual_seed(1337)
    model = GPT(GPTConfig.tiny(block_size=64))
    data = CharTextDataModule(block_size=64, batch_size=16, seed=1337)
    data.setup()
    optimizer = AdamMini(model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, backend="torch")
    for x, y in itertools.islice(data.train_dataloader(), steps):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [optimizer.state[p]["exp_avg"].view(p.shape[0], -1) for p in model.parameters() if p.dim() >= 2]


def nearest_int4(m: torch.Tensor, block: int, book: tuple[float, ...]) -> torch.Tensor:
    """``m`` through another 4-bit code ``book`` (values times the block's absmax, nearest), for comparison."""
    rows, cols = m.shape
    blocks = -(-cols // block)
    padded = torch.zeros(rows, blocks * block)
    padded[:, :cols] = m
    padded = padded.view(rows, blocks, block)
    absmax = padded.abs().amax(2, keepdim=True).clamp_min(1e-30)
    values = torch.tensor(book)
    nearest = values[(padded / absmax).unsqueeze(-1).sub(values).abs().argmin(-1)]
    return (nearest * absmax).view(rows, -1)[:, :cols]


def row(label: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], bytes_per_entry: float) -> str:
    err = sum(((q - m) ** 2).sum() for m, q in pairs).sqrt() / sum((m**2).sum() for m, _ in pairs).sqrt()
    flushed = sum(((q == 0) & (m != 0)).sum() for m, q in pairs) / sum((m != 0).sum() for m, _ in pairs)
    return f"| {label} | {bytes_per_entry:.3f} | {err:.4f} | {100 * flushed:.2f}% |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ms = momenta(args.steps)
    print(f"momentum of {len(ms)} matrices ({sum(m.numel() for m in ms):,} entries) after {args.steps} steps\n")
    print("| format | bytes/entry | relative error | non-zero entries flushed to 0 |")
    print("|---|---|---|---|")
    for name, blocks in (("int8", (32, 64, 128, 256, 512)), ("int4", (32, 64, 128, 256))):
        for block in blocks:
            fmt = MomentumFormat.of(name, block)
            pairs = []
            for m in ms:
                state = fmt.new_state(tuple(m.shape), "cpu")
                encode_(state, m, fmt)
                pairs.append((m, decode(state, fmt, m.shape)))
            size = (1.0 if name == "int8" else 0.5) + 4 / block
            print(row(f"{name}, block {block}" + (" (linear book k/7)" if name == "int4" else " (linear)"), pairs, size))
            if name == "int4":
                other = [(m, nearest_int4(m, block, NON_UNIFORM_INT4_CODE_BOOK)) for m in ms]
                print(row(f"int4, block {block} (non-uniform book)", other, size))
    print(row("bf16 (round to nearest)", [(m, m.to(torch.bfloat16).float()) for m in ms], 2.0))


if __name__ == "__main__":
    main()
