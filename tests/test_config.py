"""OptimConfig / SchedulerConfig: validation messages, the accepted forms, omegaconf round trips."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lightning_lowmem import OptimConfig, SchedulerConfig
from lightning_lowmem.kernels import BACKENDS
from lightning_lowmem.optim.registry import OPTIMIZERS, register_optimizer

NAMES = "'adamw', 'adam_mini', 'adam_mini_paper', 'eve', 'micro_adam'"
NAN = math.nan
INF = math.inf

# (keyword arguments, exception, the exact message)
BAD_OPTIM = [
    ({"name": "adam"}, ValueError, f"Invalid optimizer name: 'adam'; choose one of {NAMES}"),
    ({"name": None}, ValueError, f"Invalid optimizer name: None; choose one of {NAMES}"),
    ({"lr": -1e-3}, ValueError, "Invalid learning rate: -0.001 (must be >= 0)."),
    ({"lr": NAN}, ValueError, "Invalid learning rate: nan (must be >= 0)."),
    ({"lr": INF}, ValueError, "Invalid learning rate: inf (must be finite)."),
    ({"eps": INF}, ValueError, "Invalid epsilon: inf (must be finite)."),
    ({"lr": "1e-3"}, TypeError, "lr must be a number, got '1e-3' of type str; YAML 1.1 reads 1e-3 as a string, write it with a dot and a signed exponent (1.0e-3)."),
    ({"lr": True}, TypeError, "lr must be a number, got True of type bool."),
    ({"betas": (0.9,)}, ValueError, "betas must be a pair (beta1, beta2), got (0.9,)."),
    ({"betas": 0.9}, ValueError, "betas must be a pair (beta1, beta2), got 0.9."),
    ({"betas": (1.0, 0.999)}, ValueError, "Invalid beta1: 1.0 (must be in [0, 1))."),
    ({"betas": (NAN, 0.999)}, ValueError, "Invalid beta1: nan (must be in [0, 1))."),
    ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta2: -0.1 (must be in [0, 1))."),
    ({"betas": (0.9, NAN)}, ValueError, "Invalid beta2: nan (must be in [0, 1))."),
    ({"betas": (0.9, "x")}, TypeError, "betas[1] must be a number, got 'x' of type str."),
    ({"eps": -1e-8}, ValueError, "Invalid epsilon: -1e-08 (must be >= 0)."),
    ({"eps": NAN}, ValueError, "Invalid epsilon: nan (must be >= 0)."),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay: -0.1 (must be >= 0)."),
    ({"weight_decay": NAN}, ValueError, "Invalid weight_decay: nan (must be >= 0)."),
    ({"weight_decay": INF}, ValueError, "Invalid weight_decay: inf (must be finite)."),
    ({"rules": ["lm_head"]}, ValueError, "rules must be a mapping {regex: spec}, got ['lm_head']; e.g. {'lm_head': 'full'}."),
    ({"rules": {"(": "full"}}, ValueError, "Rule '(' is not a valid regular expression"),
    ({"rules": {"lm_head": "rows"}}, ValueError, "Rule 'lm_head': Unknown block kind 'rows'; choose one of full, row, head, tensor."),
    ({"no_decay": "bias"}, ValueError, "no_decay must be a list of roles, got 'bias'; write e.g. ['bias', 'norm']."),
    ({"no_decay": ("bias", "layernorm")}, ValueError, "Invalid no_decay role(s): ['layernorm']; choose among query, key,"),
    ({"backend": "triton!"}, ValueError, f"Invalid backend 'triton!'; choose one of {', '.join(map(repr, BACKENDS))}."),
    ({"exp_avg_dtype": "int3"}, ValueError, "Invalid exp_avg_dtype: 'int3'; choose one of 'fp32', 'bf16', 'int8', 'int4'."),
    ({"exp_avg_dtype": "int4", "exp_avg_block": 63}, ValueError, "Invalid exp_avg_block for int4: 63 (must be even: two 4-bit codes share a byte)."),
    ({"exp_avg_block": 1}, ValueError, "Invalid exp_avg_block: 1 (must be an integer >= 2)."),
    ({"exp_avg_block": "128"}, TypeError, "exp_avg_block must be an integer, got '128' of type str."),
    ({"stochastic_rounding": "yes"}, TypeError, "stochastic_rounding must be true or false, got 'yes'."),
    ({"scheduler": {"name": "step"}}, ValueError, "Invalid scheduler name: 'step'; choose one of 'none', 'cosine', 'linear'."),
    ({"scheduler": 3}, TypeError, "SchedulerConfig.from_any expects one of SchedulerConfig, dict, omegaconf DictConfig; got int: 3."),
]

BAD_SCHEDULER = [
    ({"name": "exp"}, ValueError, "Invalid scheduler name: 'exp'; choose one of 'none', 'cosine', 'linear'."),
    ({"warmup_steps": -1}, ValueError, "Invalid warmup_steps: -1 (must be >= 0)."),
    ({"warmup_steps": 1.5}, TypeError, "warmup_steps must be an integer, got 1.5 of type float."),
    ({"warmup_steps": NAN}, TypeError, "warmup_steps must be an integer, got nan of type float."),
    ({"min_lr_ratio": 1.5}, ValueError, "Invalid min_lr_ratio: 1.5 (must be in [0, 1])."),
    ({"min_lr_ratio": -0.1}, ValueError, "Invalid min_lr_ratio: -0.1 (must be in [0, 1])."),
    ({"min_lr_ratio": NAN}, ValueError, "Invalid min_lr_ratio: nan (must be in [0, 1])."),
    ({"total_steps": 0}, ValueError, "Invalid total_steps: 0 (must be >= 1, or None for the Trainer's)."),
    ({"total_steps": "100"}, TypeError, "total_steps must be an integer, got '100' of type str."),
    ({"warmup_steps": 10, "total_steps": 5}, ValueError,
     "Invalid warmup_steps: 10 (must be <= total_steps = 5); lower scheduler.warmup_steps or train for more steps."),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_OPTIM, ids=[str(k) for k, _, _ in BAD_OPTIM])
def test_bad_optim_values_raise_exact_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        OptimConfig(**kwargs)
    with pytest.raises(error, match=re.escape(message)):  # the same through a dict
        OptimConfig.from_any(kwargs)


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_SCHEDULER, ids=[str(k) for k, _, _ in BAD_SCHEDULER])
def test_bad_scheduler_values_raise_exact_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SchedulerConfig(**kwargs)
    with pytest.raises(error, match=re.escape(message)):  # nested in an optimizer config
        OptimConfig.from_any({"scheduler": kwargs})


def test_unknown_keys_list_the_valid_keys():
    message = (
        "Unknown key(s) for OptimConfig: 'lrr' (did you mean 'lr'?), 'foo'; valid keys: name, lr, betas, eps, "
        "weight_decay, rules, no_decay, backend, exp_avg_dtype, exp_avg_block, stochastic_rounding, scheduler."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        OptimConfig.from_any({"lrr": 0.1, "foo": 1})
    nested = "Unknown key(s) for SchedulerConfig: 'warmup' (did you mean 'warmup_steps'?); valid keys: name, warmup_steps, min_lr_ratio, total_steps."
    with pytest.raises(ValueError, match=re.escape(nested)):
        OptimConfig.from_any(OmegaConf.create({"scheduler": {"warmup": 10}}))


def test_from_any_rejects_other_types():
    message = "OptimConfig.from_any expects one of OptimConfig, dict, omegaconf DictConfig; got list: ['adam_mini']."
    with pytest.raises(TypeError, match=re.escape(message)):
        OptimConfig.from_any(["adam_mini"])


FULL = {
    "name": "eve",
    "lr": 0.01,
    "betas": [0.8, 0.95],
    "eps": 1e-6,
    "weight_decay": 0.1,
    "rules": {r"head\.weight$": "head:4", "emb": "full"},
    "no_decay": ["bias"],
    "backend": "torch",
    "scheduler": {"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1, "total_steps": 20},
}


def test_dict_dataclass_and_dictconfig_give_the_same_config():
    expected = OptimConfig(
        name="eve", lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
        rules={r"head\.weight$": "head:4", "emb": "full"}, no_decay=("bias",), backend="torch",
        scheduler=SchedulerConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1, total_steps=20),
    )
    structured = OmegaConf.merge(OmegaConf.structured(OptimConfig), FULL)
    forms = [FULL, expected, OmegaConf.create(FULL), structured, OptimConfig(**FULL)]
    for form in forms:
        cfg = OptimConfig.from_any(form)
        assert cfg == expected
        assert isinstance(cfg.betas, tuple) and isinstance(cfg.no_decay, tuple)
        assert isinstance(cfg.scheduler, SchedulerConfig)
    assert OmegaConf.to_object(structured) == expected


def test_defaults_are_valid_and_roundtrip_through_omegaconf_yaml():
    cfg = OptimConfig()
    assert (cfg.name, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == ("adam_mini", 1e-3, (0.9, 0.999), 1e-8, 0.01)
    assert cfg.no_decay == ("bias", "norm", "embedding", "tied_embedding") and cfg.rules == {}
    assert cfg.scheduler == SchedulerConfig(name="none", warmup_steps=0, min_lr_ratio=0.0, total_steps=None)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert OptimConfig.from_any(OmegaConf.create(yaml)) == cfg
    assert OptimConfig.from_any({}) == cfg


def test_dictconfig_interpolations_are_resolved():
    cfg = OmegaConf.create({"base_lr": 0.02, "optim": {"lr": "${base_lr}", "scheduler": {"total_steps": "${steps}"}}, "steps": 7})
    out = OptimConfig.from_any(cfg.optim)
    assert out.lr == 0.02 and out.scheduler.total_steps == 7


def test_rules_specs_are_canonicalised():
    cfg = OptimConfig(rules={"q": {"kind": "head", "head_dim": 4}, "k": " row "})
    assert cfg.rules == {"q": "head:4", "k": "row"}


def test_from_any_revalidates_a_changed_config_and_returns_a_copy():
    cfg = OptimConfig()
    assert OptimConfig.from_any(cfg) is not cfg
    cfg.lr = -1.0
    with pytest.raises(ValueError, match=re.escape("Invalid learning rate: -1.0 (must be >= 0).")):
        OptimConfig.from_any(cfg)


def test_valid_names_come_from_the_registry():
    with pytest.raises(ValueError, match="Invalid optimizer name: 'toy_sgd'"):
        OptimConfig(name="toy_sgd")

    @register_optimizer("toy_sgd")
    def _toy(model, cfg):  # pragma: no cover - only registered
        raise NotImplementedError

    try:
        assert OptimConfig(name="toy_sgd").name == "toy_sgd"
        with pytest.raises(ValueError, match=re.escape("choose one of " + NAMES + ", 'toy_sgd'")):
            OptimConfig(name="nope")
    finally:
        del OPTIMIZERS["toy_sgd"]


def test_a_fresh_process_validates_names_without_importing_the_optimizers_first():
    # `import lightning_lowmem` is lazy: the config must still know the built-in names
    code = "from lightning_lowmem import OptimConfig; print(OptimConfig(name='eve').name, OptimConfig().name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["eve", "adam_mini"]


def test_configs_are_plain_dataclasses():
    assert [f.name for f in dataclasses.fields(SchedulerConfig)] == ["name", "warmup_steps", "min_lr_ratio", "total_steps"]
    assert dataclasses.asdict(OptimConfig())["scheduler"]["name"] == "none"
