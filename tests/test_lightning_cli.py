"""LightningCLI configures every optimizer with all its arguments, through dependency injection.

The model takes an ``OptimizerCallable`` (Lightning's documented pattern) and hands it to the mixin
as ``self.lowmem_optimizer``; LightningCLI fills the class and its arguments from a YAML or the
command line, and the mixin calls it with the module, so blocks come from the model's structure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowmem import AdamMini, Eve, LowMemOptimizerMixin, MicroAdam
from lightning_lowmem.optim import NamedAdamW

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")
from lightning.pytorch.cli import LightningCLI, OptimizerCallable  # noqa: E402  # after the importorskip

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli"),  # Lightning's use of jsonargparse
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended"),  # pytest's argv is not ours
]
VOCAB = 11


class Injected(LowMemOptimizerMixin, L.LightningModule):
    """Embedding, ``nn.MultiheadAttention`` (2 heads), LayerNorm and a head; the optimizer is injected."""

    def __init__(self, optimizer: OptimizerCallable = AdamMini) -> None:
        super().__init__()
        self.lowmem_optimizer = optimizer
        self.emb = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, VOCAB)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (idx,) = batch
        x = self.emb(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1), idx.flatten())


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))), batch_size=4)


#: class path, init_args as YAML would give them, and what the optimizer must then hold.
YAMLS: dict[str, tuple[type, str, dict[str, Any]]] = {
    "adam_mini": (AdamMini, "lr: 0.02\n      betas: [0.8, 0.9]\n      eps: 1.0e-6\n      weight_decay: 0.2\n"
                  "      preset: adam_mini_paper\n      rules: {'norm': full}\n      no_decay: [bias]\n      maximize: true\n"
                  "      backend: torch",
                  dict(lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2, maximize=True)),
    "eve": (Eve, "lr: 0.03\n      betas: [0.85, 0.95]\n      weight_decay: 0.0\n      backend: torch",
            dict(lr=0.03, betas=(0.85, 0.95), eps=1e-8, weight_decay=0.0)),
    "micro_adam": (MicroAdam, "lr: 0.004\n      window: 4\n      density: 0.25\n      block_size: 16\n      quant_bucket: 8\n"
                   "      min_compressed_numel: 32\n      error_feedback: false\n      weight_decay: 0.1\n      backend: torch",
                   dict(lr=0.004, window=4, density=0.25, block_size=16, quant_bucket=8, min_compressed_numel=32,
                        error_feedback=False, weight_decay=0.1)),
    "adamw": (NamedAdamW, "lr: 0.005\n      weight_decay: 0.3\n      amsgrad: true", dict(lr=0.005, weight_decay=0.3, amsgrad=True)),
}


def run(tmp_path: Path, args: list[str]) -> LightningCLI:
    trainer = ["--seed_everything=0", "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
               "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(Injected, Data, run=False, args=args + trainer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


@pytest.mark.parametrize("name", list(YAMLS))
def test_a_yaml_selects_the_optimizer_and_every_argument(tmp_path, name):
    cls, init_args, expected = YAMLS[name]
    config = tmp_path / "run.yaml"  # not config.yaml: LightningCLI saves its own config.yaml in the log dir
    config.write_text(f"model:\n  optimizer:\n    class_path: {cls.__module__}.{cls.__qualname__}\n    init_args:\n      {init_args}\n")
    cli = run(tmp_path, [f"--config={config}"])
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is cls and cli.trainer.global_step == 2
    first = optimizer.param_groups[0]
    assert {key: first[key] for key in expected} == expected
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in cli.model.named_parameters())  # built from the module: named
    if name == "adam_mini":  # the preset and rules reached the plan; only biases go undecayed
        plan = cli.model.lowmem_plan
        assert plan.preset == "adam_mini_paper" and plan["norm.weight"].kind == "full"
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
        assert optimizer.param_groups[1]["param_names"] == ["attn.in_proj_bias", "attn.out_proj.bias", "norm.bias", "head.bias"]
    if name == "micro_adam":
        assert optimizer.compressed_names() == ["emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]


def test_the_command_line_selects_the_optimizer_and_its_arguments(tmp_path):
    cli = run(tmp_path, ["--model.optimizer=lightning_lowmem.Eve", "--model.optimizer.lr=0.02",
                         "--model.optimizer.betas=[0.9, 0.95]", "--model.optimizer.backend=torch"])
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is Eve and optimizer.plan.preset == "eve"
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]) == (0.02, (0.9, 0.95))


def test_the_default_is_used_without_arguments(tmp_path):
    cli = run(tmp_path, [])
    assert type(cli.trainer.optimizers[0]) is AdamMini and cli.model.lowmem_plan.preset == "adam_mini"


def test_a_refused_argument_fails_with_its_message(tmp_path):
    with pytest.raises(ValueError, match=r"AdamMini does not take fused=True: .*backend='auto'"):
        Injected(optimizer=lambda module: AdamMini(module, fused=True)).configure_optimizers()
    with pytest.raises(TypeError, match=r"Injected.lowmem_optimizer is called with the module itself, and refused it: "
                                        r"'Injected' object is not iterable. Use an optimizer that takes a model"):
        Injected(optimizer=torch.optim.SGD).configure_optimizers()


def test_lightning_cli_own_optimizer_option_is_refused_with_the_injection_route():
    model = Injected()
    with pytest.raises(ValueError, match=r"With LightningCLI, whose --optimizer passes model.parameters\(\), inject the "
                                        r"optimizer into the model instead: an OptimizerCallable argument set as "
                                        r"self.lowmem_optimizer of LowMemOptimizerMixin"):
        AdamMini(model.parameters())  # what LightningCLI(optimizer=...) calls
