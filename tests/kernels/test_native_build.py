"""The C kernel's build survives a missing, failing and hanging compiler, once per process.

Each test runs with an empty kernel cache and a fake ``$CC`` (a script), so nothing here depends on
the machine's compiler except the tests that build the real kernel.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from _cases import ENTRIES, HPARAMS, TOL, make_tensors  # tests/kernels/_cases.py

import lightning_lowmem.kernels.block_adam_native as block_adam_native
from lightning_lowmem.kernels import backends, block_adam_cpu, native, resolve
from lightning_lowmem.optim.functional import block_adam
from lightning_lowmem.optim.placement import layout_for

NAMES = sorted(ENTRIES)


def _clear_caches() -> None:
    for cache in (native.build_library, block_adam_cpu.rows_kernel_build, block_adam_cpu._kernel,
                  backends._resolve, backends._report):
        cache.cache_clear()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no build remembered in this process (restored afterwards)."""
    monkeypatch.setenv("LIGHTNING_LOWMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    _clear_caches()
    yield tmp_path
    monkeypatch.undo()
    _clear_caches()


def _fake_compiler(directory, body: str):
    """An executable script standing in for ``cc``; every run appends a line to ``runs``."""
    path = directory / "fake-cc"
    path.write_text(f"#!/bin/sh\necho run >> {directory / 'runs'}\n{body}\n")
    path.chmod(0o755)
    return path


def _runs(directory) -> int:
    runs = directory / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = block_adam_native.block_adam_rows_

    def spy(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(block_adam_native, "block_adam_rows_", spy)
    return calls


def _step_all(backend: str):
    cases = [make_tensors(ENTRIES[name], torch.float32, seed=i) for i, name in enumerate(NAMES)]
    layouts = [layout_for(ENTRIES[name], torch.device("cpu")) for name in NAMES]
    steps = [torch.tensor(0.0) for _ in NAMES]
    params, exp_avgs, exp_avg_sqs = ([case[0][k] for case in cases] for k in range(3))
    for t in range(2):
        block_adam(params, [case[1][t] for case in cases], exp_avgs, exp_avg_sqs, steps, layouts, backend=backend,
                   **HPARAMS)
    return params, exp_avgs, exp_avg_sqs


def _assert_follows_the_reference(got) -> None:
    expected = _step_all("torch")
    for name, *pairs in zip(NAMES, *got, *expected):
        for g, e in zip(pairs[:3], pairs[3:]):
            torch.testing.assert_close(g, e, **TOL[torch.float32], msg=name)


def test_a_failing_compiler_warns_once_with_its_message_and_is_not_retried(fresh_build, monkeypatch, kernel_calls):
    cc = _fake_compiler(fresh_build, 'echo "fatal error: stdint.h: No such file or directory" >&2\nexit 1')
    monkeypatch.setenv("CC", str(cc))
    with pytest.warns(RuntimeWarning) as record:
        got = _step_all("auto")
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "stdint.h: No such file or directory" in messages[0]  # the compiler's own words
    assert f"{native.ENV_SWITCH}=0" in messages[0] and "backend='compile'" in messages[0]  # how to switch it off
    runs = _runs(fresh_build)
    assert runs == len(native.FLAG_SETS)  # each flag set tried once
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _step_all("auto")
    assert _runs(fresh_build) == runs  # remembered for the process: no rebuild at the next steps
    assert kernel_calls == []
    _assert_follows_the_reference(got)


def test_a_hanging_compiler_is_killed_and_never_stops_the_step(fresh_build, monkeypatch, kernel_calls):
    # the script starts a child that would hold the output pipe open: killing the group ends both
    cc = _fake_compiler(fresh_build, "sleep 60 &\nsleep 60")
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv(native.ENV_TIMEOUT, "0.5")
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="did not finish within 0.5 s"):
        got = _step_all("native")
    assert time.monotonic() - started < 20
    assert kernel_calls == []
    _assert_follows_the_reference(got)
    build = block_adam_cpu.rows_kernel_build()
    assert build.library is None and build.failed


def test_without_a_compiler_native_warns_once_and_auto_only_logs(fresh_build, monkeypatch, kernel_calls, caplog):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    assert native.find_compiler() is None
    with pytest.warns(RuntimeWarning, match="no-such-compiler.*is not on the PATH"):
        got = _step_all("native")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _step_all("native")
        with caplog.at_level("INFO", logger=backends.__name__):
            _step_all("auto")
    assert "is not on the PATH" in caplog.text
    assert kernel_calls == []
    _assert_follows_the_reference(got)


def test_the_environment_switch_turns_the_kernel_off_without_running_a_compiler(fresh_build, monkeypatch, kernel_calls):
    cc = _fake_compiler(fresh_build, "exit 1")
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _step_all("auto")
    assert _runs(fresh_build) == 0 and kernel_calls == []
    assert resolve("block_adam", "auto", "cpu").__name__ == "block_adam_compiled_"
    _assert_follows_the_reference(got)


@pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")
def test_the_library_is_built_once_and_reused(fresh_build):
    build = native.build_library("block_adam_rows")
    assert build.library is not None and build.path.parent == fresh_build / "cache" / "kernels"
    stamp = build.path.stat().st_mtime_ns
    native.build_library.cache_clear()
    assert native.build_library("block_adam_rows").path == build.path
    assert [p.stat().st_mtime_ns for p in build.path.parent.glob("block_adam_rows-*.so")] == [stamp]


@pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")
def test_build_kernels_command_builds_ahead_and_names_the_cache(fresh_build, capsys):
    from lightning_lowmem.cli import main

    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert str(fresh_build / "cache" / "kernels") in out
    assert all(name in out for name in native.kernel_names())
    assert list((fresh_build / "cache" / "kernels").glob("block_adam_rows-*.so"))


def test_build_kernels_command_fails_with_the_compilers_message(fresh_build, monkeypatch, capsys):
    from lightning_lowmem.cli import main

    monkeypatch.setenv("CC", str(_fake_compiler(fresh_build, 'echo "error: unknown target" >&2\nexit 1')))
    assert main(["build-kernels"]) == 1
    assert "error: unknown target" in capsys.readouterr().err
    assert os.environ["CC"].endswith("fake-cc")
