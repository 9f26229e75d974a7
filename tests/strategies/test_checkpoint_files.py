"""One-process checks of the checkpoint file helpers: atomic publication, integrity, timeout, loss guard.

The multi-process behaviour (saves killed by SIGKILL, resumes, refusals under ``lowmem_fsdp``) is in
``test_checkpoint_faults.py``; here the files are real ``torch.save`` archives and real
``torch.distributed.checkpoint`` directories written in one process.
"""

from __future__ import annotations

import json
import os
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_lowmem.strategies import CheckpointError, LowMemFSDPStrategy, mark_complete, verify_checkpoint
from lightning_lowmem.strategies.atomic import STAGE_HOOKS, clean_leftovers, discard, old_path, partial_path, publish
from lightning_lowmem.strategies.integrity import MARKER_NAME, checkpoint_problems, file_entries, write_marker
from lightning_lowmem.strategies.loss_guard import LossGuard, NonFiniteLossError
from lightning_lowmem.strategies.timeout import TIMEOUT_ENV, collective_timeout


def sharded(path: Path, value: float, marked: bool = True) -> Path:
    """A sharded checkpoint as the strategy writes it: DCP files, meta.pt, then the marker."""
    dcp.save({"state_dict": {"w": torch.full((64, 64), value)}}, checkpoint_id=path)
    torch.save({"global_step": int(value)}, path / "meta.pt")
    if marked:
        write_marker(path, file_entries(path, sorted(f.name for f in path.iterdir())))
    return path


# ---- publish ------------------------------------------------------------------------------------


def test_publish_replaces_a_directory_and_the_old_one_is_whole_until_then(tmp_path):
    final = sharded(tmp_path / "last.ckpt", 1.0)
    new = sharded(partial_path(final), 2.0)
    seen = {}

    def at_replaced(stage: str, path: Path) -> None:
        # the previous checkpoint still exists, complete, when the new one is in place
        seen["old"] = checkpoint_problems(partial_path(path)) if partial_path(path).exists() else None
        seen["final_step"] = torch.load(path / "meta.pt")["global_step"]

    STAGE_HOOKS.append(at_replaced)
    try:
        publish(new, final)
    finally:
        STAGE_HOOKS.remove(at_replaced)
    assert seen == {"old": [], "final_step": 2}
    assert torch.load(final / "meta.pt")["global_step"] == 2
    assert checkpoint_problems(final) == []
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_publish_file_over_directory_and_back(tmp_path):
    final = sharded(tmp_path / "x.ckpt", 1.0)
    torch.save({"a": 1}, partial_path(final))
    publish(partial_path(final), final)
    assert final.is_file() and torch.load(final)["a"] == 1
    sharded(partial_path(final), 3.0)
    publish(partial_path(final), final)
    assert final.is_dir() and sorted(os.listdir(tmp_path)) == ["x.ckpt"]


def test_discard_and_clean_leftovers(tmp_path):
    final = sharded(tmp_path / "a.ckpt", 1.0)
    discard(final)
    assert not final.exists() and not old_path(final).exists()
    partial_path(final).mkdir()
    old_path(final).write_text("x")
    clean_leftovers(final)
    assert os.listdir(tmp_path) == []


# ---- integrity ----------------------------------------------------------------------------------


def test_marked_directory_passes_and_lists_every_file(tmp_path):
    path = sharded(tmp_path / "c.ckpt", 1.0)
    marker = json.loads((path / MARKER_NAME).read_text())
    assert set(marker["files"]) == {f.name for f in path.iterdir()} - {MARKER_NAME}
    verify_checkpoint(path)


def test_zeros_inside_a_shard_are_caught(tmp_path):
    path = sharded(tmp_path / "c.ckpt", 1.0)
    (shard,) = path.glob("*.distcp")
    data = bytearray(shard.read_bytes())
    data[4096:8192] = bytes(4096)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is damaged \(CRC32"):
        verify_checkpoint(path)
    # the split between ranks finds it on exactly one of them
    found = [checkpoint_problems(path, rank, 2) for rank in range(2)]
    assert sorted(map(len, found)) == [0, 1]


def test_unmarked_directory_is_refused_until_marked(tmp_path):
    path = sharded(tmp_path / "c.ckpt", 1.0, marked=False)
    with pytest.raises(CheckpointError, match="no completion marker .*mark_complete"):
        verify_checkpoint(path)
    mark_complete(path)
    verify_checkpoint(path)


def test_unmarked_directory_without_shards_names_them(tmp_path):
    path = sharded(tmp_path / "c.ckpt", 1.0, marked=False)
    (shard,) = path.glob("*.distcp")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name} \(absent\)"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing"):
        mark_complete(path)


def test_torch_save_file_zeros_and_truncation_are_caught(tmp_path):
    path = tmp_path / "f.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, path)
    verify_checkpoint(path)
    data = path.read_bytes()
    (tmp_path / "zeros.ckpt").write_bytes(data[:100_000] + bytes(4096) + data[104_096:])
    # what torch itself does with it: loads without complaint
    torch.load(tmp_path / "zeros.ckpt", mmap=True)
    with pytest.raises(CheckpointError, match="'f/data/0' is damaged"):
        verify_checkpoint(tmp_path / "zeros.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="incomplete or not a torch.save file"):
        verify_checkpoint(tmp_path / "cut.ckpt")
    assert zipfile.is_zipfile(path)


def test_missing_checkpoint_points_at_its_leftovers(tmp_path):
    final = tmp_path / "last.ckpt"
    sharded(old_path(final), 1.0)
    with pytest.raises(CheckpointError, match=r"does not exist \(.*\.last\.ckpt\.old.*rename it back"):
        verify_checkpoint(final)


# ---- timeout and loss guard ---------------------------------------------------------------------


def test_collective_timeout_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout(None) == timedelta(minutes=30)
    assert collective_timeout(12) == timedelta(seconds=12)
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout(None) == timedelta(seconds=90)
    assert collective_timeout(timedelta(seconds=5)) == timedelta(seconds=5)  # the argument wins
    # what the registered "lowmem_fsdp" string builds
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_lowmem  # noqa: F401 - registers the strategy

    assert StrategyRegistry.get("lowmem_fsdp")._timeout == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("env", "arg", "match"),
    [
        ("ten", None, "LOWMEM_FSDP_TIMEOUT must be a number of seconds, got 'ten'"),
        ("0", None, r"\$LOWMEM_FSDP_TIMEOUT must be a positive, finite number of seconds, got 0.0"),
        ("nan", None, "positive, finite"),
        (None, -1, "timeout must be a positive, finite number of seconds, got -1"),
        (None, timedelta(0), "timeout must be a positive"),
    ],
)
def test_bad_timeouts_are_refused(monkeypatch, env, arg, match):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(TIMEOUT_ENV, env)
    with pytest.raises(ValueError, match=match):
        LowMemFSDPStrategy(timeout=arg)


def test_nonfinite_loss_action_is_checked():
    with pytest.raises(ValueError, match=r"nonfinite_loss must be one of \('raise', 'skip', 'ignore'\), got 'warn'"):
        LowMemFSDPStrategy(nonfinite_loss="warn")


def test_loss_guard_records_across_micro_batches_and_resets():
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    guard = LossGuard("skip")
    for loss in (torch.tensor(float("nan")), {"loss": torch.tensor(1.0)}):  # NaN in the first micro-batch
        guard.record(loss)
    seen = []
    guard.check([param], 5, lambda local: seen.append(local) or local)
    assert seen == [True] and param.grad is None
    param.grad = torch.ones(2)
    guard.check([param], 6, lambda local: local)  # nothing recorded since: no action
    assert param.grad is not None
    guard = LossGuard("raise")
    guard.record(torch.tensor(1.0))
    with pytest.raises(NonFiniteLossError, match="at step 7 \\(on another rank\\)"):
        guard.check([param], 7, lambda local: True)  # another rank saw a NaN
