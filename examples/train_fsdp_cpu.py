"""Train a small GPT on 2 CPU processes with FSDP2 (``strategy="lowmem_fsdp"``) and AdamMini.

    python examples/train_fsdp_cpu.py                          # about a minute on a 2-core CPU
    python examples/train_fsdp_cpu.py --optimizer eve --steps 100
    python examples/train_fsdp_cpu.py --devices 1              # the same run on one process

The strategy shards the model by itself: every block of ``transformer.h`` (an ``nn.ModuleList``)
becomes an FSDP2 unit, then the root (embeddings, final norm, tied head). Each parameter is a
``DTensor`` with its global shape and half its rows on each rank, so AdamMini finds the same blocks
(attention heads, rows) as on one device and each rank keeps the optimizer state of its own rows.

Lightning starts the second process by running this script again with ``LOCAL_RANK=1``; everything
before ``main()`` must therefore be free of side effects.

What to look for in the output:

* each rank holds about half of the parameters and half of the optimizer state (compare with
  ``--devices 1``);
* the checkpoint is one ordinary Lightning file (``save_distributed_checkpoint=False``): rank 0
  loads its ``state_dict`` into a plain, unsharded model and gets the same validation loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_lowmem import AdamMini, Eve, LowMemFSDPStrategy
from lightning_lowmem.data import CharTextDataModule
from lightning_lowmem.models import GPT, GPTConfig
from lightning_lowmem.utils import optimizer_param_count, optimizer_state_bytes


class LitGPT(L.LightningModule):
    """A GPT and its optimizer. No ``configure_model``: the strategy shards it."""

    def __init__(self, optimizer: str = "adam_mini", lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        # 4 blocks of width 128, 4 heads: 0.8M parameters, byte-level vocabulary.
        self.gpt = GPT(GPTConfig.tiny(block_size=64))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx, targets)[1]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(*batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(*batch), sync_dist=True)  # mean over ranks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Runs after sharding: the optimizers read global shapes from the DTensor parameters.
        name, lr = self.hparams.optimizer, self.hparams.lr
        if name in ("adam_mini", "adam_mini_paper"):
            return AdamMini(self, lr=lr, betas=(0.9, 0.99), weight_decay=0.1, preset=name, backend="torch")
        if name == "eve":
            return Eve(self, lr=lr, betas=(0.9, 0.99), weight_decay=0.1, backend="torch")
        return torch.optim.AdamW(self.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", default="adam_mini", choices=["adam_mini", "adam_mini_paper", "eve", "adamw"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp_cpu"))
    args = parser.parse_args()

    L.seed_everything(1337)  # the same initial weights on every rank
    torch.set_num_threads(1)  # 2 processes on 2 cores
    data = CharTextDataModule(block_size=64, batch_size=16, seed=1337)
    model = LitGPT(args.optimizer)
    strategy = LowMemFSDPStrategy(save_distributed_checkpoint=False)  # one full file, readable without FSDP
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,  # or strategy="lowmem_fsdp" for the defaults (a sharded checkpoint directory)
        max_steps=args.steps,
        gradient_clip_val=1.0,
        limit_val_batches=8,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, datamodule=data)

    # What this rank holds: parameter shards and the optimizer state of its rows.
    optimizer = trainer.optimizers[0]
    params, state = optimizer_param_count(optimizer), optimizer_state_bytes(optimizer)
    total = sum(p.numel() for p in model.parameters())
    print(f"rank {trainer.global_rank}: {params:,} of {total:,} parameters, {args.optimizer} state "
          f"{state / 1e6:.2f} MB ({state / params:.2f} bytes/param)", flush=True)

    path = args.out / f"gpt_{args.optimizer}_{args.devices}proc.ckpt"
    trainer.save_checkpoint(path)  # gathers the full weights and optimizer state on rank 0

    # The same 8 validation batches through the sharded model (every rank, it all-gathers) and,
    # on rank 0, through a plain model that loads the checkpoint file.
    batches = list(data.val_dataloader())[:8]
    with torch.no_grad():
        sharded = torch.stack([model(x, y) for x, y in batches]).mean().item()
    if trainer.is_global_zero:
        plain = LitGPT(args.optimizer)  # no strategy, no process group
        plain.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        with torch.no_grad():
            loaded = torch.stack([plain(x, y) for x, y in batches]).mean().item()
        print(f"validation loss: sharded model {sharded:.4f}, checkpoint in a plain model {loaded:.4f}\n"
              f"checkpoint: {path}")


if __name__ == "__main__":
    main()
