"""``LowMemFSDPStrategy`` on 2 CPU processes (gloo) against one process: weights, checkpoints, errors.

All runs happen in two launches of ``_dist_worker.py`` (2 processes, then 1 process that resumes
the 2-process checkpoints); the tests read what they left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _launch import launch  # tests/_launch.py: tests/ is on sys.path through its conftest.py

WORKER = Path(__file__).with_name("_dist_worker.py")
OPTIMIZERS = ("adamw", "adam_mini", "adam_mini_paper", "eve", "micro_adam", "adam_mini_int8", "adam_mini_int4")
RESUMED = ("adamw", "adam_mini", "micro_adam", "adam_mini_int8", "adam_mini_int4")  # the worker resumes these (its RESUMED)
TIMEOUT = 180


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    args = [str(out), ",".join(OPTIMIZERS)]
    seconds = {
        "dist": launch(WORKER, ["dist", *args], nprocs=2, timeout=TIMEOUT),
        "single": launch(WORKER, ["single", *args], nprocs=1, timeout=TIMEOUT),
    }
    facts = {mode: json.loads((out / f"{mode}.json").read_text()) for mode in seconds}
    return out, facts, seconds


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}.pt", map_location="cpu")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return max(((x - b[k]).abs().max().item(), k) for k, x in a.items())


# ---- a sharded run equals one process --------------------------------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_processes_match_one_process_after_5_steps(runs, optimizer):
    out, facts, _ = runs
    diff, name = max_diff(weights(out, f"equal_{optimizer}"), weights(out, f"equal_{optimizer}_plain"))
    assert diff < 1e-5, (name, diff)
    # the weights moved: the comparison is not between two untouched models
    from _dist_worker import Net

    initial_diff, _ = max_diff(weights(out, f"equal_{optimizer}"), Net().state_dict())
    assert initial_diff > 1e-2


def test_auto_sharding_makes_every_parameter_a_dtensor_and_blocks_units(runs):
    _, facts, _ = runs
    probe = facts["dist"]["equal_adamw"]
    assert probe["all_dtensor"]
    assert probe["fsdp_units"] == ["<root>", "blocks.0", "blocks.1"]
    assert probe["placements"]["head.weight"] == "(Shard(dim=0),)"  # 3 rows over 2 ranks: 2 | 1


def test_gradient_norms_of_dtensor_grads_equal_one_process(runs):
    _, facts, _ = runs
    for run in ("equal_adamw", "clip_accum_adamw"):
        sharded, single = facts["dist"][run]["grad_norms"], facts["single"][run]["grad_norms"]
        assert len(sharded) == len(single) > 0
        assert sharded == pytest.approx(single, rel=1e-5)


def test_gradient_clipping_and_accumulation_match_one_process(runs):
    out, facts, _ = runs
    assert len(facts["single"]["clip_accum_adamw"]["grad_norms"]) == 4  # 2 epochs x 4 micro-batches / 2
    assert min(facts["single"]["clip_accum_adamw"]["grad_norms"]) > 0.05  # so clip_val=0.05 clipped every step
    diff, name = max_diff(weights(out, "clip_accum_adamw"), weights(out, "clip_accum_adamw_plain"))
    assert diff < 1e-5, (name, diff)


def test_validate_after_fit_reuses_the_sharded_model(runs):
    _, facts, _ = runs
    sharded, single = facts["dist"]["clip_accum_adamw"]["val_loss"], facts["single"]["clip_accum_adamw"]["val_loss"]
    assert sharded == pytest.approx(single, rel=1e-5)


def test_activation_checkpointing_does_not_change_the_result(runs):
    out, _, _ = runs
    diff, name = max_diff(weights(out, "checkpointed_adamw"), weights(out, "equal_adamw"))
    assert diff < 1e-6, (name, diff)


def test_mixed_precision_policy_keeps_fp32_shards(runs):
    _, facts, _ = runs
    mp = facts["dist"]["mixed_precision"]
    assert mp["dtypes"] == ["torch.float32"]
    assert len(mp["losses"]) == 2 and all(0 < loss < 10 for loss in mp["losses"])


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", RESUMED)
@pytest.mark.parametrize("fmt", ["full", "dcp"])
def test_resume_on_two_processes_equals_uninterrupted_run(runs, fmt, optimizer):
    out, _, _ = runs
    diff, name = max_diff(weights(out, f"resume_{fmt}_{optimizer}_w2"), weights(out, f"uninterrupted_{optimizer}_w2"))
    assert diff < 1e-6, (name, diff)


@pytest.mark.parametrize("optimizer", RESUMED)
@pytest.mark.parametrize("fmt", ["full", "dcp"])
def test_resume_on_one_process_equals_uninterrupted_run(runs, fmt, optimizer):
    out, _, _ = runs
    diff, name = max_diff(weights(out, f"resume_{fmt}_{optimizer}_w1"), weights(out, f"uninterrupted_{optimizer}_w2"))
    assert diff < 1e-5, (name, diff)


@pytest.mark.parametrize("optimizer", RESUMED)
def test_full_checkpoint_resumes_in_a_plain_trainer(runs, optimizer):
    out, _, _ = runs
    diff, name = max_diff(weights(out, f"resume_full_{optimizer}_plain"), weights(out, f"uninterrupted_{optimizer}_plain"))
    assert diff < 1e-5, (name, diff)


@pytest.mark.parametrize("optimizer", RESUMED)
def test_full_checkpoint_has_lightning_format_and_global_state_shapes(runs, optimizer):
    from _dist_worker import Net

    from lightning_lowmem.partition import build_plan

    out, _, _ = runs
    ckpt = torch.load(out / "ckpt" / optimizer / "epoch-full.ckpt", map_location="cpu", weights_only=False)
    assert {"state_dict", "optimizer_states", "loops", "epoch", "global_step", "pytorch-lightning_version"} <= ckpt.keys()
    assert ckpt["global_step"] == 3
    model = Net(optimizer)
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
    for name, p in model.named_parameters():
        assert ckpt["state_dict"][name].shape == p.shape, name
    (optim_state,) = ckpt["optimizer_states"]
    ids = [i for group in optim_state["param_groups"] for i in group["params"]]
    assert all(isinstance(i, int) for i in ids)  # keyed like a plain optimizer.state_dict()
    if optimizer == "micro_adam":
        _check_micro_adam_state(model, optim_state, ids)
        return
    plan = build_plan(model, optimizer.removesuffix("_int8").removesuffix("_int4")) if optimizer != "adamw" else None
    # the optimizer's groups follow the model's parameters (AdamW) or the plan's decay groups (AdamMini)
    named = dict(model.named_parameters())
    names = [n for group in optim_state["param_groups"] for n in group.get("param_names", [])] or list(named)
    assert len(names) == len(ids)
    for i, name in zip(ids, names):
        state = optim_state["state"][i]
        packed = optimizer == "adam_mini_int4" and named[name].dim() >= 2  # two codes a byte
        shape = (named[name].shape[0], -(-named[name].shape[1] // 2)) if packed else named[name].shape
        assert state["exp_avg"].shape == shape, name
        expected = named[name].shape if plan is None else plan[name].state_shape()
        assert tuple(state["exp_avg_sq"].shape) == tuple(expected), name
        if optimizer.startswith("adam_mini_int") and named[name].dim() >= 2:  # codes, a scale per block of 4 of a row
            rows, cols = named[name].shape
            assert state["exp_avg"].dtype == (torch.int8 if optimizer.endswith("int8") else torch.uint8), name
            assert state["exp_avg_scale"].shape == (rows, -(-cols // 4)) and state["exp_avg_scale"].dtype == torch.float32


def _check_micro_adam_state(model, optim_state, ids) -> None:
    """Compressed state with the global row-aligned shapes and dtypes of one process; AdamW state for 1-D."""
    from _dist_worker import make_optimizer

    reference = make_optimizer(model, "micro_adam")
    named = dict(model.named_parameters())
    dtypes = {"window": torch.int32, "error": torch.uint8, "error_min": torch.bfloat16, "error_max": torch.bfloat16}
    compressed = set(reference.compressed_names())
    assert compressed == {n for n, p in named.items() if p.dim() == 2}
    names = [n for group in optim_state["param_groups"] for n in group["param_names"]]
    assert len(names) == len(ids) == len(named)
    for i, name in zip(ids, names):
        state, param = optim_state["state"][i], named[name]
        if name not in compressed:
            assert {k: v.shape for k, v in state.items() if k != "step"} == {"exp_avg": param.shape, "exp_avg_sq": param.shape}
            continue
        shapes = reference.layout_of(param, reference.param_groups[0]).state_shapes(window=3)
        assert {k: tuple(v.shape) for k, v in state.items() if k != "step"} == shapes, name
        assert {k: v.dtype for k, v in state.items() if k != "step"} == dtypes, name


def test_distributed_checkpoint_is_a_directory_of_shards(runs):
    out, _, _ = runs
    path = out / "ckpt" / "adamw" / "epoch-dcp.ckpt"
    assert path.is_dir()
    assert (path / "meta.pt").is_file()
    assert len(list(path.glob("*.distcp"))) == 2


# ---- refusals and user-written configure_model -----------------------------------------------


@pytest.mark.parametrize("fmt", ["full", "dcp"])
def test_plain_tensor_state_on_sharded_parameter_is_refused_at_save_time(runs, fmt):
    out, facts, _ = runs
    error = facts["dist"][f"refuse_plain_state_{fmt}"]
    assert error is not None and error["type"] == "ValueError", error
    assert "'local_buf'" in error["message"] and "'blocks.0.norm1.weight'" in error["message"]
    assert "'step'" not in error["message"]  # the scalar step is allowed
    assert not (out / f"refused-plain-{fmt}.ckpt").exists()


def test_partial_dtensor_state_is_refused_at_save_time(runs):
    _, facts, _ = runs
    error = facts["dist"]["refuse_partial_state_dcp"]
    assert error is not None and error["type"] == "ValueError", error
    assert "'sq_sum'" in error["message"] and "Partial" in error["message"]


def test_user_configure_model_that_shards_is_respected(runs):
    _, facts, _ = runs
    probe = facts["dist"]["user_sharded"]
    assert probe["fsdp_units"] == ["<root>"]  # its own choice: no per-block units added
    assert probe["all_dtensor"]
    error = facts["dist"]["user_sharded_with_auto_option"]
    assert error["type"] == "ValueError"
    assert "shard_modules" in error["message"] and "UserShardedNet.configure_model" in error["message"]


def test_configure_model_that_does_not_shard_is_sharded_automatically(runs):
    _, facts, _ = runs
    probe = facts["dist"]["unsharded_configure"]
    assert probe["all_dtensor"]
    assert probe["fsdp_units"] == ["<root>", "blocks.0", "blocks.1"]


@pytest.mark.parametrize(
    ("case", "error_type", "fragments"),
    [
        ("scalar_param", "ValueError", ["0-dim", "'temperature'", "torch.tensor([value])"]),
        ("fsdp1_module", "TypeError", ["FullyShardedDataParallel", "['up']", "fully_shard"]),
        ("shard_modules_not_found", "ValueError", ["['GRU']", "Block", "MLP"]),
        ("cpu_offload_on_cpu", "ValueError", ["cpu_offload=True", "GPU"]),
    ],
)
def test_bad_models_give_clear_errors(runs, case, error_type, fragments):
    _, facts, _ = runs
    error = facts["single"][case]
    assert error is not None and error["type"] == error_type, error
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
