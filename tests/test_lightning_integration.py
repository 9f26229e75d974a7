"""The optimizers where Lightning and PyTorch users put one: fine-tuning callbacks, frozen layers, new heads.

Lightning's own ``BackboneFinetuning`` unfreezes the backbone mid-run with
``optimizer.add_param_group({"params": [tensors]})`` and, on resume, restores its param groups by
assigning ``optimizer.param_groups``; both paths run here for every optimizer the mixin builds.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowmem import AdamMini, Eve, LowMemOptimizerMixin, MicroAdam
from lightning_lowmem.partition import build_plan

#: Each case: an optimizer config for ``self.hparams.optim``, or a factory for ``self.lowmem_optimizer``.
CASES: dict[str, dict[str, Any]] = {
    "adamw": {"optim": {"name": "adamw", "lr": 0.01}},
    "adam_mini": {"optim": {"name": "adam_mini", "lr": 0.01, "backend": "torch"}},
    "eve": {"optim": {"name": "eve", "lr": 0.01, "backend": "torch"}},
    "micro_adam": {"optim": {"name": "micro_adam", "lr": 0.01, "backend": "torch"}},
    # compressed state for every matrix (the defaults compress only tensors of 4096+ elements)
    "micro_adam_factory": {"factory": functools.partial(MicroAdam, lr=0.01, min_compressed_numel=64, block_size=32,
                                                        density=0.25, window=3, quant_bucket=4, backend="torch")},
}
UNFREEZE_AT = 1


class FineTune(LowMemOptimizerMixin, L.LightningModule):
    """A backbone (Linear, LayerNorm, Linear) that ``BackboneFinetuning`` freezes, and a head."""

    def __init__(self, optim: dict[str, Any] | None = None, factory: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["factory"])
        self.lowmem_optimizer = factory
        self.backbone = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 3)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(torch.relu(self.backbone(x))), y)


class Snapshots(Callback):
    """The backbone's weights at every epoch end, and the optimizer's state dict when training starts."""

    def __init__(self) -> None:
        self.backbone: list[dict[str, torch.Tensor]] = []
        self.state_at_start: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state_at_start = copy.deepcopy(trainer.optimizers[0].state_dict())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backbone.append({n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()})


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)), batch_size=4)


def fit(case: str, epochs: int, callbacks: list[Callback], seed: int = 0, ckpt: Path | None = None) -> FineTune:
    torch.manual_seed(seed)
    module = FineTune(**CASES[case])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_AT), *callbacks])
    trainer.fit(module, loader(), ckpt_path=ckpt)
    return module


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize("case", list(CASES))
def test_backbone_finetuning_unfreezes_mid_run_then_resumes(case, tmp_path):
    snaps = Snapshots()
    full = fit(case, 3, [snaps])
    optimizer = full.trainer.optimizers[0]
    backbone = [f"backbone.{n}" for n, _ in full.backbone.named_parameters()]
    assert optimizer.param_groups[-1]["param_names"] == backbone  # named from the module, as the others
    first, second = snaps.backbone[0], snaps.backbone[1]
    torch.manual_seed(0)
    initial = FineTune(**CASES[case])  # not trained: the same seed gives the same initial weights
    assert all(torch.equal(first[n], p) for n, p in initial.backbone.named_parameters())  # frozen in epoch 0
    assert all(not torch.equal(first[n], second[n]) for n in first)  # trained from epoch 1
    plan = getattr(optimizer, "plan", None)
    if plan is not None:  # the new parameters got the blocks the module's structure gives them
        structural = build_plan(initial, plan.preset)
        assert all(plan[n] == structural[n] for n in backbone)

    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    fit(case, 2, [checkpoints])
    # from before the unfreeze: the callback unfreezes after the resume, as in the uninterrupted run
    resumed = fit(case, 3, [], seed=7, ckpt=tmp_path / "epoch=0.ckpt")
    assert same_weights(resumed, full)
    # from after it: BackboneFinetuning assigns the saved groups, then the optimizer state loads into them
    snaps = Snapshots()
    fit(case, 3, [snaps], seed=7, ckpt=tmp_path / "epoch=1.ckpt")
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["optimizer_states"][0]
    restored = snaps.state_at_start
    assert [g["param_names"] for g in restored["param_groups"]] == [g["param_names"] for g in saved["param_groups"]]
    assert saved["param_groups"][-1]["param_names"] == backbone and restored["state"].keys() == saved["state"].keys()
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert restored["state"][key][name].dtype == value.dtype and torch.equal(restored["state"][key][name], value)


# ---- frozen parameters and new heads, in plain PyTorch -----------------------------------------


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        heads = [self.head] + ([self.head2] if hasattr(self, "head2") else [])
        return sum(F.cross_entropy(h(x.mean(1)), idx[:, 0] % 3) for h in heads)


def steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 2) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randint(0, 11, (4, 5), generator=gen)).backward()
        optimizer.step()


@pytest.mark.parametrize("cls", [AdamMini, Eve])
def test_named_parameters_with_a_frozen_embedding(cls):
    torch.manual_seed(0)
    model = Classifier()
    model.emb.weight.requires_grad_(False)
    optimizer = cls(model.named_parameters(), lr=0.01, backend="torch")
    frozen = model.emb.weight.detach().clone()
    steps(model, optimizer)
    assert torch.equal(model.emb.weight, frozen) and not optimizer.state[model.emb.weight]
    model.emb.weight.requires_grad_(True)  # unfreezing the torch way: the optimizer already holds it
    steps(model, optimizer)
    assert not torch.equal(model.emb.weight, frozen)
    assert optimizer.state[model.emb.weight]["exp_avg_sq"].shape == optimizer.plan["emb.weight"].state_shape()


def test_a_plan_without_a_trainable_parameter_says_how_to_build_one():
    model = Classifier()
    model.head.requires_grad_(False)
    plan = build_plan(model)  # no entries for the frozen head
    model.head.requires_grad_(True)
    message = ("The block plan has no entry for the trainable parameters ['head.weight', 'head.bias']: it was built from "
               "another model, or while they were frozen. Build it from this model once they are trainable "
               "(build_plan(model)), leave out plan= to let the optimizer build it, or add rules for them.")
    with pytest.raises(ValueError, match=re.escape(message)):
        AdamMini(model.named_parameters(), plan=plan)
    model.head.requires_grad_(False)
    optimizer = AdamMini(model.named_parameters(), plan=plan, backend="torch")  # frozen: blocks when first trained
    model.head.requires_grad_(True)
    steps(model, optimizer)
    assert optimizer.plan["head.weight"].kind == "row"


@pytest.mark.parametrize("cls", [AdamMini, Eve, MicroAdam])
@pytest.mark.parametrize("form", ["tensors", "pairs"])
def test_add_param_group_of_a_new_head(cls, form):
    torch.manual_seed(0)
    model = Classifier()
    optimizer = cls(model, lr=0.01, backend="torch")
    steps(model, optimizer)
    model.head2 = nn.Linear(8, 3)
    params = list(model.head2.parameters()) if form == "tensors" else list(model.head2.named_parameters(prefix="head2"))
    optimizer.add_param_group({"params": params, "lr": 0.02})
    assert optimizer.param_groups[-1]["param_names"] == ["head2.weight", "head2.bias"]
    plan = getattr(optimizer, "plan", None)
    if plan is not None:  # blocks from the module's structure: a Linear output head
        assert plan["head2.weight"] == build_plan(model, plan.preset)["head2.weight"]
    before = model.head2.weight.detach().clone()
    steps(model, optimizer)
    assert not torch.equal(model.head2.weight, before)
    assert optimizer.state[model.head2.weight]["step"].item() == 2


@pytest.mark.parametrize("cls", [AdamMini, MicroAdam])
def test_add_param_group_of_unknown_tensors_fails_at_once(cls):
    model = Classifier()
    optimizer = cls(model, lr=0.01, backend="torch")
    stray = nn.Parameter(torch.zeros(3, 8))
    with pytest.raises(ValueError, match=re.escape(
        f"Tensor 0 of the new param group ([3, 8]) is not a parameter of the Classifier this {cls.__name__} was built "
        "on, so it has no name. Add (name, tensor) pairs instead."
    )):
        optimizer.add_param_group({"params": [stray]})
    copied = copy.deepcopy(optimizer)  # a copy has no model to take names from
    with pytest.raises(ValueError, match=re.escape("Pass (name, tensor) pairs: add_param_group({'params': [(name, p), ...]})")):
        copied.add_param_group({"params": [stray]})
    copied.add_param_group({"params": [("extra.weight", stray)]})
    assert copied.param_groups[-1]["param_names"] == ["extra.weight"]
