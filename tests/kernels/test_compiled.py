"""``torch.compile`` of an update falls back to eager only when COMPILATION fails, never after it ran."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from lightning_lowmem.kernels import compiled as compiled_module
from lightning_lowmem.kernels.compiled import CompiledWithFallback, recompile_limit_names


def _add_one_(x: torch.Tensor) -> None:
    x.add_(1.0)


def test_a_compilation_error_warns_once_and_the_update_runs_once(monkeypatch):
    update = CompiledWithFallback(_add_one_)

    def fails_to_compile(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("InvalidCxxCompiler: no working C++ compiler"), None)

    update.compiled = fails_to_compile
    x = torch.zeros(3)
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler: no working C.. compiler.*running the eager reference from now on"):
        update(x)
    assert torch.equal(x, torch.ones(3))  # applied once, eagerly
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        update(x)
    assert torch.equal(x, torch.full((3,), 2.0)) and update.failed


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CPU out of memory"), RuntimeError("shape [3] vs [4]")],
                         ids=["oom", "shape"])
def test_an_error_while_the_compiled_update_runs_propagates_and_nothing_reruns(error):
    calls = []

    def reference(x):
        calls.append("eager")

    update = CompiledWithFallback(reference)

    def runs_then_fails(x):
        x.add_(1.0)  # half of an update was applied before the failure
        raise error

    update.compiled = runs_then_fails
    x = torch.zeros(3)
    with pytest.raises(type(error)) as raised:
        update(x)
    assert raised.value is error
    assert calls == [] and not update.failed  # not applied a second time, compilation stays on
    assert torch.equal(x, torch.ones(3))


def test_a_real_shape_error_inside_the_graph_propagates():
    def bad_update(x: torch.Tensor, y: torch.Tensor) -> None:
        x.add_(y)

    update = CompiledWithFallback(bad_update)
    x = torch.zeros(3)
    with pytest.raises(RuntimeError, match="broadcast|must match"):
        update(x, torch.ones(4))
    assert torch.equal(x, torch.zeros(3)) and not update.failed


def test_a_graph_break_counts_as_a_compilation_error():
    def update_with_break(x: torch.Tensor) -> None:
        x.add_(1.0)
        print("", end="")  # unsupported inside a full graph

    update = CompiledWithFallback(update_with_break)
    x = torch.zeros(2)
    with pytest.warns(RuntimeWarning, match="torch.compile of update_with_break failed"):
        update(x)
    assert torch.equal(x, torch.ones(2)) and update.failed


def test_recompile_limit_names_follow_the_torch_version():
    assert recompile_limit_names() == ("recompile_limit", "accumulated_recompile_limit")
    assert all(hasattr(torch._dynamo.config, name) for name in recompile_limit_names())
    before_2_7 = types.SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=256)
    assert recompile_limit_names(before_2_7) == ("cache_size_limit", "accumulated_cache_size_limit")


def test_more_shapes_than_the_graph_limit_run_eagerly_without_a_warning(monkeypatch):
    monkeypatch.setattr(compiled_module, "MAX_GRAPHS", 2)
    update = CompiledWithFallback(_add_one_)
    tensors = [torch.zeros(n) for n in (1, 2, 3, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for x in tensors:
            update(x)
            update(x)
    assert all(torch.equal(x, torch.full_like(x, 2.0)) for x in tensors) and not update.failed
