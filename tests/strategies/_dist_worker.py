"""Lightning runs for ``tests/strategies``: every 2-process scenario in one launch, then the 1-process ones.

Run as ``python _dist_worker.py dist OUT OPTIMIZERS`` in each of 2 processes (the test sets
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, so Lightning's environment treats them as launched
externally), then as ``python _dist_worker.py single OUT OPTIMIZERS`` in one process. OPTIMIZERS is a
comma-separated subset of :data:`OPTIMIZERS`. Results go to OUT: final weights as ``<run>.pt``
(full, gathered on rank 0), checkpoints under ``ckpt/``, and facts as ``<mode>.json``.

Data order: each rank reads every world_size-th sample (no DistributedSampler, which always
shuffles), with a per-rank batch of ``GLOBAL_BATCH / world_size``; FSDP2 averages gradients over
ranks, so a 2-process step equals a 1-process step on the whole global batch. Runs that are resumed
stop at epoch ends (a run stopped by ``max_steps`` mid-epoch replays part of it on resume).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial

from lightning_lowmem.strategies import LowMemFSDPStrategy, total_grad_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the launcher's helpers
from _launch import end_worker  # noqa: E402

OPTIMIZERS = ("adamw", "adam_mini", "adam_mini_paper", "eve", "micro_adam", "adam_mini_int8", "adam_mini_int4")
#: Optimizers whose runs are also checkpointed and resumed (2 -> 2 and 2 -> 1 processes, both formats).
RESUMED = ("adamw", "adam_mini", "micro_adam", "adam_mini_int8", "adam_mini_int4")
GLOBAL_BATCH = 8
DIM, HEADS, SEQ, CLASSES = 6, 3, 4, 3
PG_TIMEOUT = timedelta(seconds=60)


# ---- the model ---------------------------------------------------------------------------------


class Attention(nn.Module):
    """3 heads of 2 rows in a 6-row q_proj: on 2 ranks (rows 0-2 | 3-5) head 1 straddles the shard line."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, DIM // HEADS
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        # No key bias: softmax ignores it, so its gradient is 0 up to round-off, which Adam's
        # m / sqrt(v) blows up to full-size steps that differ between any two runs.
        self.k_proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, DIM))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 8), nn.Linear(8, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(DIM), Attention(), nn.LayerNorm(DIM), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(L.LightningModule):
    """Two blocks in a ModuleList, then Linear(6, 8) and a Linear(8, 3) head (3 rows: split 2 | 1)."""

    def __init__(self, optimizer: str = "adamw", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.optimizer_name = optimizer
        self.blocks = nn.ModuleList([Block(), Block()])
        self.up = nn.Linear(DIM, 8)
        self.head = nn.Linear(8, CLASSES)
        self.grad_norms: list[float] = []
        self.losses: list[float] = []

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(torch.tanh(self.up(x.mean(dim=1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    # The steps do not call self(...): the root's own parameters (up, head) are used outside
    # forward, which only works because the strategy registers the steps as FSDP forward methods.
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.logits(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.logits(x), y), sync_dist=True)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grad_norms.append(total_grad_norm(self.parameters()).item())

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.optimizer_name)


def resumed(optimizers: list[str]) -> list[str]:
    return [name for name in optimizers if name in RESUMED]


def make_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    from lightning_lowmem.optim import AdamMini, Eve

    if name in ("adam_mini", "adam_mini_paper"):
        return AdamMini(model, lr=1e-2, weight_decay=0.1, preset=name, backend="torch")
    if name in ("adam_mini_int8", "adam_mini_int4"):  # codes and scales sharded like their rows
        return AdamMini(model, lr=1e-2, weight_decay=0.1, exp_avg_dtype=name[-4:], exp_avg_block=4, backend="torch")
    if name == "eve":
        return Eve(model, lr=1e-2, weight_decay=0.1, backend="torch")
    if name == "micro_adam":
        from lightning_lowmem.optim import MicroAdam

        # every weight compressed (min 16 elements), rows of 6 or 8 cut into 2 blocks (3+3, 4+4) and
        # buckets of 4 (4+2 for rows of 6); biases and norms keep AdamW state
        return MicroAdam(model, lr=1e-2, weight_decay=0.1, window=3, density=0.25, block_size=4, quant_bucket=4,
                         min_compressed_numel=16, backend="torch")
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


class ScalarParamNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0))


def fsdp1_wrapper(module: nn.Module) -> nn.Module:
    """An FSDP1 ``FullyShardedDataParallel`` around ``module`` without running its constructor
    (which needs a GPU): enough for ``isinstance`` and ``named_modules``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper._fsdp_wrapped_module = module
    return wrapper


class FSDP1Net(Net):
    def configure_model(self) -> None:
        self.up = fsdp1_wrapper(self.up)


class UserShardedNet(Net):
    """Shards only the root, itself: the strategy must not shard the blocks (but must register the
    steps as forward methods, since they use the root's parameters outside forward)."""

    def configure_model(self) -> None:
        fully_shard(self, mesh=self.device_mesh["data_parallel"], reshard_after_forward=False)


class UnshardedConfigureNet(Net):
    """A configure_model that builds a layer but does not shard: the strategy shards automatically."""

    def __init__(self) -> None:
        super().__init__()
        self.head = None  # built in configure_model

    def configure_model(self) -> None:
        if self.head is None:
            torch.manual_seed(1)
            self.head = nn.Linear(8, CLASSES)


class PlainStateSGD(torch.optim.SGD):
    """Keeps a plain per-rank tensor in the state of sharded parameters: must be refused at save time."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                local = p.to_local() if isinstance(p, DTensor) else p
                self.state[p]["step"] = torch.tensor(1.0)
                self.state[p]["local_buf"] = torch.zeros_like(local)
        return super().step(closure)


class PartialStateSGD(torch.optim.SGD):
    """Keeps an unreduced (Partial) DTensor in the state: cannot be checkpointed, must be refused."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)  # Lightning's closure runs forward and backward
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    local_sum = p.grad.to_local().square().sum()
                    self.state[p]["sq_sum"] = DTensor.from_local(local_sum, p.device_mesh, [Partial()])
        return loss


class PlainStateNet(Net):
    def __init__(self, optimizer_class: type = PlainStateSGD) -> None:
        super().__init__()
        self.optimizer_class = optimizer_class

    def configure_optimizers(self) -> Any:
        return self.optimizer_class(self.parameters(), lr=0.1)


# ---- data, trainers, results -------------------------------------------------------------------


def dataset(n: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(123)
    return torch.utils.data.TensorDataset(torch.randn(n, SEQ, DIM, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen))


def loader(n: int, world: int, rank: int) -> torch.utils.data.DataLoader:
    data = torch.utils.data.Subset(dataset(n), list(range(rank, n, world)))
    return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // world, shuffle=False)


def trainer(world: int, *, strategy: Any = "default", **kwargs: Any) -> L.Trainer:
    if strategy == "default":
        strategy = LowMemFSDPStrategy(timeout=PG_TIMEOUT)
    kwargs.setdefault("logger", False)
    return L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy if strategy is not None else "auto",
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", [])),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **kwargs,
    )


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (a collective when the model is sharded)."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Results:
    def __init__(self, out: Path, mode: str, rank: int) -> None:
        self.out, self.mode, self.rank = out, mode, rank
        self.facts: dict[str, Any] = {}

    def weights(self, name: str, model: nn.Module) -> None:
        state = full_weights(model)
        if self.rank == 0:
            torch.save(state, self.out / f"{name}.pt")

    def fact(self, name: str, value: Any) -> None:
        self.facts[name] = value

    def error(self, name: str, fn: Any) -> None:
        """Run ``fn``, recording the type and message of what it raises (or ``None``)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded for the test to check
            self.facts[name] = {"type": type(e).__name__, "message": str(e)}
        else:
            self.facts[name] = None

    def save(self) -> None:
        if self.rank == 0:
            (self.out / f"{self.mode}.json").write_text(json.dumps(self.facts, indent=1))


class ShardingProbe(Callback):
    """Records, after setup, whether parameters are DTensors and which modules are FSDP units."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.facts = {
            "all_dtensor": all(isinstance(p, DTensor) for p in pl_module.parameters()),
            "fsdp_units": sorted(n or "<root>" for n, m in pl_module.named_modules() if isinstance(m, FSDPModule)),
            "placements": {n: str(p.placements) for n, p in pl_module.named_parameters() if isinstance(p, DTensor)},
        }


def checkpoint_callback(directory: Path, fmt: str) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=directory, filename=f"epoch-{fmt}", every_n_epochs=1, save_top_k=-1)


def strategy_for(fmt: str) -> LowMemFSDPStrategy:
    return LowMemFSDPStrategy(save_distributed_checkpoint=(fmt == "dcp"), timeout=PG_TIMEOUT)


EPOCH_STEPS = 3  # resumed runs: 3 steps per epoch, saved after epoch 1, resumed to the end of epoch 2


# ---- scenarios ---------------------------------------------------------------------------------


def run_dist(out: Path, optimizers: list[str]) -> None:
    world, rank = 2, int(os.environ["LOCAL_RANK"])
    res = Results(out, "dist", rank)
    ckpt = out / "ckpt"

    for opt in optimizers:  # 5 steps, sharded vs one process
        model, probe = Net(opt), ShardingProbe()
        trainer(world, max_epochs=1, callbacks=[probe]).fit(model, loader(5 * GLOBAL_BATCH, world, rank))
        res.weights(f"equal_{opt}", model)
        res.fact(f"equal_{opt}", {**probe.facts, "grad_norms": model.grad_norms, "losses": model.losses})

    # activation checkpointing + reshard_after_forward=False: same weights as the plain sharded run
    model = Net("adamw")
    strategy = LowMemFSDPStrategy(activation_checkpointing=[Block], reshard_after_forward=False, timeout=PG_TIMEOUT)
    trainer(world, strategy=strategy, max_epochs=1).fit(model, loader(5 * GLOBAL_BATCH, world, rank))
    res.weights("checkpointed_adamw", model)

    # gradient clipping by norm + accumulation of 2 micro-batches, with a validation loop in between
    # then trainer.validate on the same (already sharded) model
    model = Net("adamw")
    t = trainer(world, max_epochs=2, gradient_clip_val=0.05, accumulate_grad_batches=2, limit_val_batches=1)
    t.fit(model, loader(4 * GLOBAL_BATCH, world, rank), loader(GLOBAL_BATCH, world, rank))
    res.weights("clip_accum_adamw", model)
    (metrics,) = t.validate(model, loader(2 * GLOBAL_BATCH, world, rank), verbose=False)
    res.fact("clip_accum_adamw", {"grad_norms": model.grad_norms, "val_loss": metrics["val_loss"]})

    # bf16 compute through FSDP2's MixedPrecisionPolicy: runs, sharded parameters stay fp32
    model = Net("adamw")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    trainer(world, strategy=LowMemFSDPStrategy(mixed_precision=policy, timeout=PG_TIMEOUT), max_steps=2).fit(
        model, loader(2 * GLOBAL_BATCH, world, rank)
    )
    res.fact("mixed_precision", {"losses": model.losses, "dtypes": sorted({str(p.dtype) for p in model.parameters()})})

    # save at the end of epoch 1, resume to the end of epoch 2, on 2 processes; the uninterrupted run
    for opt in resumed(optimizers):
        n = EPOCH_STEPS * GLOBAL_BATCH
        model = Net(opt)
        trainer(world, max_epochs=2).fit(model, loader(n, world, rank))
        res.weights(f"uninterrupted_{opt}_w2", model)
        for fmt in ("full", "dcp"):
            model = Net(opt)
            trainer(world, strategy=strategy_for(fmt), max_epochs=1, callbacks=[checkpoint_callback(ckpt / opt, fmt)]).fit(
                model, loader(n, world, rank)
            )
            model = Net(opt, seed=7)  # other initial weights: the checkpoint must overwrite them
            path = ckpt / opt / f"epoch-{fmt}.ckpt"
            trainer(world, strategy=strategy_for(fmt), max_epochs=2).fit(model, loader(n, world, rank), ckpt_path=path)
            res.weights(f"resume_{fmt}_{opt}_w2", model)

    # a plain tensor in the state of a sharded parameter is refused at save time, naming the key
    for name, optimizer_class, fmt in (("plain", PlainStateSGD, "full"), ("plain", PlainStateSGD, "dcp"), ("partial", PartialStateSGD, "dcp")):
        t = trainer(world, strategy=strategy_for(fmt), max_steps=1)
        t.fit(PlainStateNet(optimizer_class), loader(GLOBAL_BATCH, world, rank))
        res.error(f"refuse_{name}_state_{fmt}", lambda: t.save_checkpoint(out / f"refused-{name}-{fmt}.ckpt"))

    # a configure_model that shards is respected; one that does not shard is sharded automatically
    for name, cls in (("user_sharded", UserShardedNet), ("unsharded_configure", UnshardedConfigureNet)):
        model, probe = cls(), ShardingProbe()
        trainer(world, max_steps=1, callbacks=[probe]).fit(model, loader(GLOBAL_BATCH, world, rank))
        res.fact(name, probe.facts)
    res.error(
        "user_sharded_with_auto_option",
        lambda: trainer(world, strategy=LowMemFSDPStrategy(shard_modules=[Block], timeout=PG_TIMEOUT), max_steps=1).fit(
            UserShardedNet(), loader(GLOBAL_BATCH, world, rank)
        ),
    )
    res.save()


def run_single(out: Path, optimizers: list[str]) -> None:
    res = Results(out, "single", 0)
    ckpt = out / "ckpt"

    # references: plain single-process Trainer, no strategy, no sharding
    for opt in optimizers:
        model = Net(opt)
        trainer(1, strategy=None, max_epochs=1).fit(model, loader(5 * GLOBAL_BATCH, 1, 0))
        res.weights(f"equal_{opt}_plain", model)
        res.fact(f"equal_{opt}", {"grad_norms": model.grad_norms, "losses": model.losses})
    model = Net("adamw")
    t = trainer(1, strategy=None, max_epochs=2, gradient_clip_val=0.05, accumulate_grad_batches=2, limit_val_batches=1)
    t.fit(model, loader(4 * GLOBAL_BATCH, 1, 0), loader(GLOBAL_BATCH, 1, 0))
    res.weights("clip_accum_adamw_plain", model)
    (metrics,) = t.validate(model, loader(2 * GLOBAL_BATCH, 1, 0), verbose=False)
    res.fact("clip_accum_adamw", {"grad_norms": model.grad_norms, "val_loss": metrics["val_loss"]})
    n = EPOCH_STEPS * GLOBAL_BATCH
    for opt in resumed(optimizers):
        model = Net(opt)
        trainer(1, strategy=None, max_epochs=2).fit(model, loader(n, 1, 0))
        res.weights(f"uninterrupted_{opt}_plain", model)
        # a full-file checkpoint written on 2 processes resumes in a plain Trainer
        model = Net(opt, seed=7)
        trainer(1, strategy=None, max_epochs=2).fit(model, loader(n, 1, 0), ckpt_path=ckpt / opt / "epoch-full.ckpt")
        res.weights(f"resume_full_{opt}_plain", model)

    # both formats written on 2 processes resume on 1 with the strategy
    for opt in resumed(optimizers):
        for fmt in ("full", "dcp"):
            model = Net(opt, seed=7)
            trainer(1, strategy=strategy_for(fmt), max_epochs=2).fit(
                model, loader(n, 1, 0), ckpt_path=ckpt / opt / f"epoch-{fmt}.ckpt"
            )
            res.weights(f"resume_{fmt}_{opt}_w1", model)

    # bad inputs
    res.error("scalar_param", lambda: trainer(1, max_steps=1).fit(ScalarParamNet(), loader(GLOBAL_BATCH, 1, 0)))
    res.error("fsdp1_module", lambda: trainer(1, max_steps=1).fit(FSDP1Net(), loader(GLOBAL_BATCH, 1, 0)))
    res.error(
        "shard_modules_not_found",
        lambda: trainer(1, strategy=LowMemFSDPStrategy(shard_modules=[nn.GRU], timeout=PG_TIMEOUT), max_steps=1).fit(
            Net(), loader(GLOBAL_BATCH, 1, 0)
        ),
    )
    res.error(
        "cpu_offload_on_cpu",
        lambda: trainer(1, strategy=LowMemFSDPStrategy(cpu_offload=True, timeout=PG_TIMEOUT), max_steps=1).fit(
            Net(), loader(GLOBAL_BATCH, 1, 0)
        ),
    )
    res.save()


def main() -> None:
    mode, out, optimizers = sys.argv[1], Path(sys.argv[2]), [o for o in sys.argv[3].split(",") if o]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        run_dist(out, optimizers) if mode == "dist" else run_single(out, optimizers)
    except BaseException:
        traceback.print_exc()
        end_worker(1)  # do not wait on a peer that may be stuck in a collective
    end_worker(0)  # a barrier, then no teardown of gloo to race with the peer's (see tests/_launch.py)


if __name__ == "__main__":
    main()
