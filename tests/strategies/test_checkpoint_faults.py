"""Checkpoints under ``lowmem_fsdp`` on 2 CPU processes: saves killed with SIGKILL at chosen stages.

A stage hook (``lightning_lowmem.strategies.atomic.STAGE_HOOKS``) pauses the save of ``last.ckpt``
at one stage; the test then kills both processes, so the kill lands in that window every time. Then
one launch resumes every killed folder with ``ckpt_path="last"``, and tries the loads that must be
refused (damaged, incomplete, another optimizer, another width) and a NaN loss without callbacks.
Expectations come from an uninterrupted run and from the files themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from _launch import REPO, free_port, launch  # tests/_launch.py: tests/ is on sys.path through its conftest.py

WORKER = Path(__file__).with_name("_fault_worker.py")
TIMEOUT = 180
#: (format, stage at which the save of last.ckpt is killed, global step last.ckpt must resume from)
KILLS = [
    ("dcp", "written", 3),  # shards and meta.pt written, no completion marker
    ("dcp", "marked", 3),  # complete under its temporary name, not renamed
    ("dcp", "replaced", 6),  # renamed into place, the previous one not yet deleted
    ("full", "written", 3),  # the file written and flushed, not renamed
    ("full", "replaced", 6),
]


def kill_at_stage(out: Path, fmt: str, stage: str) -> str:
    """Launch the kill run on 2 processes, SIGKILL both once rank 0 paused at ``stage``; return the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0", WORLD_SIZE="2")
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "kill", str(out), fmt, stage], env={**env, "LOCAL_RANK": str(rank)},
                         stdout=logs[rank], stderr=subprocess.STDOUT, cwd=REPO)
        for rank in range(2)
    ]
    start, paused = time.monotonic(), out / "paused-0"
    while not paused.exists() and time.monotonic() - start < TIMEOUT and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    for proc in reversed(procs):  # rank 0 (asleep in the hook) last: the others wait on it in a collective
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    output = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        output += f"---- rank {rank} ----\n{log.read()[-4000:]}"
    assert paused.exists(), f"the save never paused at {stage!r}:\n{output}"
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, output
    return output


def zero_4k(path: Path) -> None:
    """Overwrite 4 KiB in the middle of the file (or to its end) with zeros, keeping its size."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        start = max(0, size // 2 - 2048)
        f.seek(start)
        f.write(bytes(min(4096, size - start)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    launch(WORKER, ["base", str(out)], nprocs=2, timeout=TIMEOUT)
    killed = {}
    for fmt, stage, _ in KILLS:
        scenario = out / "kills" / f"{fmt}-{stage}"
        shutil.copytree(out / fmt / "ckpt", scenario / "ckpt")
        kill_at_stage(scenario, fmt, stage)
        killed[(fmt, stage)] = sorted(os.listdir(scenario / "ckpt"))
        shutil.copytree(scenario / "ckpt", out / "scenarios" / f"{fmt}-{stage}" / "ckpt")
    refused = out / "refused"
    refused.mkdir()
    shutil.copytree(out / "kills" / "dcp-written" / "ckpt" / ".last.ckpt.partial", refused / "dcp-leftover")
    for name, damage in (("zeros", "zero"), ("truncated", "truncate"), ("missing", "delete")):
        shutil.copytree(out / "dcp" / "ckpt" / "epoch=0.ckpt", refused / f"dcp-{name}")
        shard = refused / f"dcp-{name}" / "__1_0.distcp"
        if damage == "zero":
            zero_4k(shard)
        elif damage == "truncate":
            os.truncate(shard, shard.stat().st_size // 2)
        else:
            shard.unlink()
    for name in ("zeros", "truncated"):
        shutil.copy(out / "full" / "ckpt" / "epoch=0.ckpt", refused / f"full-{name}")
        file = refused / f"full-{name}"
        zero_4k(file) if name == "zeros" else os.truncate(file, file.stat().st_size // 2)
    launch(WORKER, ["check", str(out)], nprocs=2, timeout=TIMEOUT)
    return out, killed, json.loads((out / "check.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu")


# ---- killed saves ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "stage", "step"), KILLS)
def test_killed_save_keeps_a_complete_last_checkpoint(runs, fmt, stage, step):
    out, killed, _ = runs
    listing = killed[(fmt, stage)]
    assert "last.ckpt" in listing and "epoch=0.ckpt" in listing and "epoch=1.ckpt" in listing, listing
    # the survivor is whole: a Lightning checkpoint with the step it says
    last = out / "kills" / f"{fmt}-{stage}" / "ckpt" / "last.ckpt"
    meta = last / "meta.pt" if fmt == "dcp" else last
    assert torch.load(meta, map_location="cpu", weights_only=False)["global_step"] == step
    if stage in ("written", "marked"):
        assert ".last.ckpt.partial" in listing  # the killed save's leftover, beside it


@pytest.mark.parametrize(("fmt", "stage", "step"), KILLS)
def test_resume_from_last_after_a_kill_equals_uninterrupted_run(runs, fmt, stage, step):
    out, _, facts = runs
    assert facts[f"restored-{fmt}-{stage}"] == step
    resumed, reference = weights(out / f"resumed-{fmt}-{stage}.pt"), weights(out / "reference.pt")
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.allclose(resumed[name], value, rtol=0, atol=1e-6), name
    # the next save cleaned what the killed one left
    assert not (out / "scenarios" / f"{fmt}-{stage}" / "ckpt" / ".last.ckpt.partial").exists()


# ---- incomplete and damaged checkpoints --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("dcp-leftover", "no completion marker"),
        ("dcp-zeros", "__1_0.distcp is damaged"),
        ("dcp-truncated", "__1_0.distcp has"),
        ("dcp-missing", "__1_0.distcp is missing"),
        ("full-zeros", "is damaged"),
        ("full-truncated", "incomplete"),
    ],
)
def test_incomplete_or_damaged_checkpoint_is_refused_with_its_path(runs, name, fragment):
    out, _, facts = runs
    error = facts[f"refused-{name}"]
    assert error is not None and error["type"] == "CheckpointError", error
    assert str(out / "refused" / name) in error["message"]
    assert fragment in error["message"], error["message"]


# ---- mismatches --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["dcp", "full"])
@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("adamw_to_adam_mini", ["holds AdamW state; the run uses AdamMini", "load_weights(model,"]),
        ("adam_mini_to_micro_adam", ["holds AdamMini state; the run uses MicroAdam", "load_weights(model,"]),
        ("micro_adam_to_adam_mini", ["holds MicroAdam state; the run uses AdamMini", "load_weights(model,"]),
        ("width", ["parameter 'head.weight' has shape [3, 8] in the checkpoint and [24, 8] in the model"]),
    ],
)
def test_mismatch_names_what_differs(runs, fmt, case, fragments):
    _, _, facts = runs
    error = facts[f"mismatch-{fmt}-{case}"]
    assert error is not None and error["type"] == "CheckpointError", error
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])


@pytest.mark.parametrize("fmt", ["dcp", "full"])
def test_load_weights_takes_the_weights_of_either_format_for_another_optimizer(runs, fmt):
    out, _, facts = runs
    loaded = weights(out / f"loaded-{fmt}.pt")
    saved = torch.load(out / "full" / "ckpt" / "epoch=0.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    from _dist_worker import Net

    assert any(not torch.equal(value, saved[name]) for name, value in Net(seed=7).state_dict().items())
    assert len(facts[f"loaded-{fmt}-losses"]) == 1  # and AdamMini then trains from them


# ---- non-finite loss ---------------------------------------------------------------------------


def test_nan_loss_on_one_rank_raises_on_every_rank_before_the_step(runs):
    _, _, facts = runs
    error = facts["nan-raise"]
    assert error is not None and error["type"] == "NonFiniteLossError", error
    assert "at step 2" in error["message"]
    assert facts["nan-raise-finite"] and facts["nan-raise-step"] == 2


def test_nan_loss_skipped_leaves_finite_weights(runs):
    _, _, facts = runs
    assert facts["nan-skip"] is None and facts["nan-skip-finite"] and facts["nan-skip-step"] == 4


def test_nan_loss_left_to_loss_spike_monitor(runs):
    """With LossSpikeMonitor (skip_nonfinite) the strategy's default does not raise: the monitor skips the step."""
    _, _, facts = runs
    assert facts["nan-monitor"] is None and facts["nan-monitor-finite"]
    assert facts["nan-monitor-events"] == [[2, "skip"]]


def test_nan_loss_ignored_reaches_the_weights(runs):
    """What the guard prevents: with nonfinite_loss='ignore' one NaN batch makes the weights NaN."""
    _, _, facts = runs
    assert not facts["nan-ignore-finite"]
