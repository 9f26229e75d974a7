"""In-process checks of LowMemFSDPStrategy's arguments, registration and sharding helpers (no processes)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

import lightning_lowmem
from lightning_lowmem.strategies import LowMemFSDPStrategy, clip_grad_norm_, find_blocks, total_grad_norm
from lightning_lowmem.strategies.sharding import apply_activation_checkpointing, check_shardable


def cpu_trainer(**kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, **kwargs)


def test_importing_the_package_registers_the_strategy():
    assert lightning_lowmem.LowMemFSDPStrategy is LowMemFSDPStrategy
    assert "lowmem_fsdp" in StrategyRegistry
    assert isinstance(cpu_trainer(strategy="lowmem_fsdp").strategy, LowMemFSDPStrategy)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-true"])
def test_supported_trainer_precision(precision):
    trainer = cpu_trainer(strategy=LowMemFSDPStrategy(), precision=precision)
    assert trainer.precision == precision


@pytest.mark.parametrize("strategy", ["lowmem_fsdp", "instance"])
def test_unsupported_trainer_precision_is_refused_when_the_trainer_is_built(strategy):
    strategy = LowMemFSDPStrategy() if strategy == "instance" else strategy
    # (Lightning refuses it first when it is given the instance; our check covers the registered name)
    with pytest.raises(ValueError, match=r"does not support .*precision='64-true'.*32-true'?, '?bf16-mixed"):
        cpu_trainer(strategy=strategy, precision="64-true")


def test_fp16_autocast_with_grad_scaler_is_refused_with_alternatives():
    strategy = LowMemFSDPStrategy()
    plugin = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", enabled=False))
    with pytest.raises(ValueError, match=r"'16-mixed'.*GradScaler.*MixedPrecisionPolicy"):
        strategy.precision_plugin = plugin


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mixed_precision": "bf16-mixed"}, TypeError, r"MixedPrecisionPolicy or None, got 'bf16-mixed'"),
        ({"mixed_precision": torch.bfloat16}, TypeError, r"MixedPrecisionPolicy or None"),
        ({"cpu_offload": "yes"}, TypeError, r"cpu_offload must be a bool, got 'yes'"),
        ({"reshard_after_forward": 1}, ValueError, r"reshard_after_forward must be .* got 1"),
        ({"reshard_after_forward": "yes"}, ValueError, r"reshard_after_forward must be"),
        ({"shard_modules": [int]}, TypeError, r"shard_modules must be a non-empty list of nn.Module subclasses"),
        ({"shard_modules": []}, TypeError, r"shard_modules must be a non-empty list"),
        ({"activation_checkpointing": ["Block"]}, TypeError, r"activation_checkpointing must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LowMemFSDPStrategy(**kwargs)


def test_good_arguments_are_kept():
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    strategy = LowMemFSDPStrategy(shard_modules=nn.Linear, mixed_precision=policy, activation_checkpointing=[nn.GRU],
                                  reshard_after_forward=2, save_distributed_checkpoint=False)
    assert strategy.shard_modules == (nn.Linear,)
    assert strategy.activation_checkpointing == (nn.GRU,)
    assert strategy.mixed_precision is policy
    assert strategy.reshard_after_forward == 2


# ---- finding blocks --------------------------------------------------------------------------


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([Expert(), Expert()])
        self.act = nn.ModuleList([nn.ReLU()])  # no parameters: nothing to shard
        self.norm = nn.LayerNorm(2)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 2)
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.head = nn.Linear(2, 5)


def test_find_blocks_takes_module_list_children_deepest_first():
    names = [name for name, _ in find_blocks(Model())]
    assert sorted(names) == sorted(["layers.0", "layers.1", "layers.0.experts.0", "layers.0.experts.1",
                                    "layers.1.experts.0", "layers.1.experts.1"])
    # fully_shard must see every module before its ancestors
    for i, name in enumerate(names):
        assert not any(other.startswith(name + ".") for other in names[i + 1 :]), names


def test_find_blocks_with_named_classes():
    model = Model()
    assert [name for name, _ in find_blocks(model, [Layer])] == ["layers.1", "layers.0"]
    assert [m for _, m in find_blocks(model, [Layer, nn.Embedding])][-1] is model.embed
    assert find_blocks(nn.Sequential(nn.Linear(2, 2))) == []  # no ModuleList: only the root will be sharded


def test_zero_dim_parameters_are_named():
    model = Model()
    model.layers[1].scale = nn.Parameter(torch.tensor(2.0))
    model.ok = nn.Parameter(torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"found 1: 'layers.1.scale'.*torch.tensor\(\[value\]\)"):
        check_shardable(model)
    del model.layers[1].scale
    check_shardable(model)


# ---- activation checkpointing and gradient norms ---------------------------------------------


class CountingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.fc(x))


def test_activation_checkpointing_recomputes_and_keeps_names_and_gradients():
    torch.manual_seed(0)
    reference = nn.Sequential(CountingBlock(), CountingBlock())
    model = nn.Sequential(CountingBlock(), CountingBlock())
    model.load_state_dict(reference.state_dict())
    assert apply_activation_checkpointing(model, [CountingBlock]) == ["0", "1"]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    x = torch.randn(3, 4)
    reference(x).square().sum().backward()
    model(x).square().sum().backward()
    assert [m.calls for m in model] == [2, 2]  # forward + recomputation in backward
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_gradient_norm_and_clipping_match_torch_on_plain_tensors():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2))]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = None if p.grad is None else p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    assert total_grad_norm(params) == pytest.approx(expected.item())
    assert clip_grad_norm_(params, 0.5) == pytest.approx(expected.item())
    for c, p in zip(copies[:2], params[:2]):
        torch.testing.assert_close(p.grad, c.grad)
    assert total_grad_norm(params) == pytest.approx(0.5, rel=1e-5)
