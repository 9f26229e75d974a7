"""LowMemOptimizerMixin: configure_optimizers from a config, in a Trainer, from LightningCLI, on FSDP2."""

from __future__ import annotations

import difflib
import json
import logging
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _launch import launch  # tests/_launch.py: tests/ is on sys.path through its conftest.py

from lightning_lowmem import AdamMini, Eve, LowMemOptimizerMixin, OptimConfig, SchedulerConfig
from lightning_lowmem.optim import NamedAdamW
from lightning_lowmem.optim.schedulers import lr_multiplier
from lightning_lowmem.partition import build_plan

VOCAB = 11


class LitTiny(LowMemOptimizerMixin, L.LightningModule):
    """Embedding, ``nn.MultiheadAttention`` (2 heads), LayerNorm, output head: 491 parameters."""

    def __init__(self, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.emb = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, VOCAB)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (idx,) = batch
        x = self.emb(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1), idx.flatten())


class TinyData(L.LightningDataModule):
    """40 random sequences of 6 tokens, batches of 4."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = torch.randint(0, VOCAB, (40, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=self.batch_size)


class RecordLR(L.Callback):
    """The lr of the first param group at the start of every training batch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


def _cfg(**kwargs) -> dict:
    return {"name": "adam_mini", "lr": 0.01, "backend": "torch", **kwargs}


def test_fit_trains_and_the_lr_follows_the_schedule(caplog):
    schedule = SchedulerConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1)
    torch.manual_seed(0)
    model = LitTiny(OptimConfig(**_cfg(scheduler=schedule)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = RecordLR()
    with caplog.at_level(logging.INFO):
        _trainer(callbacks=[record]).fit(model, TinyData())

    optimizer = model.trainer.optimizers[0]
    assert type(optimizer) is AdamMini
    total = 5  # estimated_stepping_batches == max_steps
    assert record.lrs == pytest.approx([0.01 * lr_multiplier(s, schedule, total) for s in range(5)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr_multiplier(5, schedule, total)) == 0.001
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "every parameter trained"

    assert model.lowmem_plan is optimizer.plan
    assert str(model.lowmem_plan) == str(build_plan(model, "adam_mini"))
    assert model.lowmem_plan["attn.in_proj_weight"].kind == "mixed"  # Q, K by head, V by row
    assert str(model.lowmem_plan) in caplog.text, "the plan's table is logged"


def test_total_steps_from_the_config_wins_over_the_trainer():
    schedule = {"name": "linear", "total_steps": 10}
    model = LitTiny(_cfg(scheduler=schedule))
    _trainer().fit(model, TinyData())
    expected = 0.01 * lr_multiplier(5, SchedulerConfig(**schedule), 10)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected) == 0.005


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_checkpoint_keeps_the_config_and_resumes_the_schedule(tmp_path):
    """The OptimConfig in the hparams loads with torch.load(weights_only=True); the lr resumes mid-schedule."""
    schedule = SchedulerConfig(name="cosine", warmup_steps=1, min_lr_ratio=0.2, total_steps=6)
    model = LitTiny(OptimConfig(**_cfg(name="eve", scheduler=schedule)))
    trainer = _trainer(max_steps=3)
    trainer.fit(model, TinyData())
    trainer.save_checkpoint(tmp_path / "step3.ckpt")

    restored = LitTiny.load_from_checkpoint(tmp_path / "step3.ckpt", weights_only=True)
    assert restored.hparams.optim == model.hparams.optim
    record = RecordLR()
    _trainer(max_steps=6, callbacks=[record]).fit(restored, TinyData(), ckpt_path=tmp_path / "step3.ckpt")
    assert record.lrs == pytest.approx([0.01 * lr_multiplier(s, schedule, 6) for s in (3, 4, 5)])


def test_return_value_and_scheduler_entry():
    out = LitTiny(_cfg(scheduler={"name": "cosine", "total_steps": 8})).configure_optimizers()
    assert set(out) == {"optimizer", "lr_scheduler"}
    assert out["lr_scheduler"]["interval"] == "step" and out["lr_scheduler"]["frequency"] == 1
    assert isinstance(out["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LambdaLR)
    assert set(LitTiny(_cfg()).configure_optimizers()) == {"optimizer"}  # "none": no scheduler entry


def test_dict_dataclass_and_dictconfig_give_the_same_optimizer():
    data = _cfg(name="eve", betas=[0.8, 0.9], weight_decay=0.2, scheduler={"name": "linear", "total_steps": 4})
    built = []
    for form in (data, OptimConfig.from_any(data), OmegaConf.create(data)):
        torch.manual_seed(0)
        model = LitTiny(form)
        built.append((model, model.configure_optimizers()["optimizer"]))
    (_, first), *others = built
    for model, optimizer in built:
        assert type(optimizer) is Eve
        assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for g in first.param_groups
        ]
        assert str(model.lowmem_plan) == str(first.plan)


def test_attribute_config_and_adamw_has_no_plan():
    class WithAttribute(LitTiny):
        def __init__(self) -> None:
            super().__init__()
            self.lowmem_optim_config = {"name": "adamw", "lr": 0.02}

    model = WithAttribute()
    out = model.configure_optimizers()
    assert type(out["optimizer"]) is NamedAdamW and out["optimizer"].param_groups[0]["lr"] == 0.02
    assert isinstance(out["optimizer"], torch.optim.AdamW)
    assert model.lowmem_plan is None


def test_hparams_come_before_the_attribute():
    model = LitTiny(_cfg(name="eve"))
    model.lowmem_optim_config = _cfg(name="adamw")
    assert type(model.configure_optimizers()["optimizer"]) is Eve


def test_missing_config_says_where_to_put_it():
    message = (
        "LitTiny has no optimizer config for LowMemOptimizerMixin. Either give the model an `optim` argument "
        "and call self.save_hyperparameters() in __init__ (it is read from self.hparams.optim; with LightningCLI: "
        "--model.optim.name=adam_mini), set self.lowmem_optim_config = OptimConfig(...) (or a dict) in __init__, "
        "or set self.lowmem_optimizer = AdamMini (or LightningCLI's OptimizerCallable) to build it from the module. "
        "Optimizers: adamw, adam_mini, adam_mini_paper, eve"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        LitTiny().configure_optimizers()


def test_invalid_config_fails_in_configure_optimizers():
    with pytest.raises(ValueError, match=re.escape("Unknown key(s) for OptimConfig: 'lrr' (did you mean 'lr'?)")):
        LitTiny({"lrr": 0.1}).configure_optimizers()


def test_schedule_length_unknown_without_trainer():
    message = "LitTiny is not attached to a Trainer, so the schedule's length is unknown: set scheduler.total_steps"
    with pytest.raises(ValueError, match=re.escape(message)):
        LitTiny(_cfg(scheduler={"name": "cosine"})).configure_optimizers()


def test_schedule_length_infinite_estimate():
    model = LitTiny(_cfg(scheduler={"name": "cosine"}))
    with pytest.raises(ValueError, match=re.escape("The Trainer's estimated_stepping_batches is inf")):
        _trainer(max_steps=-1, max_epochs=-1).fit(model, TinyData())


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")  # Lightning's use of jsonargparse
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")  # pytest's argv is not ours
@pytest.mark.parametrize("source", ["args", "yaml"])
def test_lightning_cli(tmp_path, source):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")
    from lightning.pytorch.cli import LightningCLI

    trainer_args = ["--seed_everything=0", "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
                    "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                    f"--trainer.default_root_dir={tmp_path}"]
    if source == "args":
        args = ["--model.optim.name=eve", "--model.optim.lr=0.01", "--model.optim.backend=torch",
                "--model.optim.betas=[0.9, 0.95]", "--data.batch_size=2"]
    else:
        config = tmp_path / "run.yaml"  # not config.yaml: LightningCLI saves its own config.yaml in the log dir
        config.write_text("model:\n  optim:\n    name: eve\n    lr: 0.01\n    backend: torch\n    betas: [0.9, 0.95]\n"
                          "data:\n  batch_size: 2\n")
        args = [f"--config={config}"]
    cli = LightningCLI(LitTiny, TinyData, run=False, args=args + trainer_args)
    assert OptimConfig.from_any(cli.model.hparams.optim) == OptimConfig(name="eve", lr=0.01, backend="torch", betas=(0.9, 0.95))
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is Eve and optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert cli.model.lowmem_plan.preset == "eve"


FSDP_WORKER = r'''
import datetime, importlib.util, json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(sys.argv[1]).parent))  # tests/: the launcher's helpers
from _launch import end_worker

spec = importlib.util.spec_from_file_location("lowmem_test_module", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
dist.init_process_group("gloo", rank=int(os.environ["LOCAL_RANK"]), world_size=2, timeout=datetime.timedelta(seconds=60))
cfg = {"name": sys.argv[3], "lr": 0.01, "backend": "torch", "scheduler": {"name": "cosine", "total_steps": 4}}


def build():
    torch.manual_seed(0)
    return mod.LitTiny(cfg).double()  # float64: the key bias's round-off gradients stay negligible


def train(model, out, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model.training_step((torch.randint(0, mod.VOCAB, (4, 6), generator=gen),), 0)
        out["optimizer"].zero_grad()
        loss.backward()
        out["optimizer"].step()
        out["lr_scheduler"]["scheduler"].step()


ref = build()
ref_out = ref.configure_optimizers()
train(ref, ref_out)
sharded = build()
for child in (sharded.emb, sharded.attn, sharded.norm, sharded.head):  # what configure_model would do
    fully_shard(child)
out = sharded.configure_optimizers()
all_dtensor = all(isinstance(p, DTensor) for p in sharded.parameters())
train(sharded, out)
diff = {n: (p.full_tensor() - ref.get_parameter(n)).abs().max().item() for n, p in sharded.named_parameters()}
if dist.get_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"all_dtensor": all_dtensor, "plan": str(sharded.lowmem_plan), "ref_plan": str(ref.lowmem_plan),
                   "details": sharded.lowmem_plan.details(), "ref_details": ref.lowmem_plan.details(), "diff": diff}, f)
end_worker(0)  # a barrier, then no teardown of gloo to race with the peer's (see tests/_launch.py)
'''


def test_fsdp2_dtensor_parameters(tmp_path):
    """On 2 gloo ranks (rows split unevenly: head 6 | 5), the plan and the trained weights match one process."""
    worker, out = tmp_path / "worker.py", tmp_path / "out.json"
    worker.write_text(FSDP_WORKER)
    launch(worker, [__file__, str(out), "adam_mini"], nprocs=2, timeout=120)
    result = json.loads(out.read_text())
    assert result["all_dtensor"]
    for key in ("plan", "details"):
        sharded_lines, ref_lines = result[key].splitlines(), result[f"ref_{key}"].splitlines()
        assert sharded_lines == ref_lines, "\n".join(difflib.unified_diff(ref_lines, sharded_lines, "one process", "sharded", lineterm=""))
    for name, diff in result["diff"].items():
        assert diff < 1e-9, (name, diff)
