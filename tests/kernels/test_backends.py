"""``kernels.resolve``: the one place where a backend string becomes an implementation."""

from __future__ import annotations

import pytest
import torch

from lightning_lowmem.kernels import BACKENDS, backends, register, resolve
from lightning_lowmem.kernels.block_adam import block_adam_compiled_, block_adam_multi_update_


def fake_triton_update_(*args, **kwargs) -> None:
    """Stands in for a Triton implementation."""


@pytest.fixture
def scratch_op(monkeypatch):
    """An op registered for this test only."""
    monkeypatch.setitem(backends.IMPLEMENTATIONS, "scratch", {})
    backends._resolve.cache_clear()
    yield "scratch"
    backends._resolve.cache_clear()


def test_a_registered_backend_is_what_auto_picks_where_it_runs(scratch_op):
    here = "lightning_lowmem.kernels.block_adam"
    register(scratch_op, "torch", f"{here}:block_adam_multi_update_")
    register(scratch_op, "compile", f"{here}:block_adam_compiled_")
    register(scratch_op, "triton", f"{__name__}:fake_triton_update_", devices=("cuda",))
    assert resolve(scratch_op, "auto", "cuda") is fake_triton_update_
    assert resolve(scratch_op, "auto", "cpu") is block_adam_compiled_  # devices: auto picks it for CUDA only
    assert resolve(scratch_op, "torch", "cuda") is block_adam_multi_update_
    assert resolve(scratch_op, "native", "cpu") is block_adam_compiled_  # no C kernel for this op


def test_an_unavailable_triton_is_an_error_when_asked_for_and_skipped_by_auto(scratch_op, monkeypatch):
    monkeypatch.setattr(backends, "_unavailable", lambda implementation: backends.Unavailable("no triton here"))
    register(scratch_op, "compile", "lightning_lowmem.kernels.block_adam:block_adam_compiled_")
    register(scratch_op, "triton", f"{__name__}:fake_triton_update_", devices=("cuda",))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: no triton here"):
        resolve(scratch_op, "triton", "cuda")
    assert resolve(scratch_op, "auto", "cuda") is block_adam_compiled_


def test_without_torch_compile_the_reference_runs(monkeypatch):
    monkeypatch.setattr(backends, "compile_supported", lambda: False)
    backends._resolve.cache_clear()
    try:
        assert resolve("block_adam", "compile", "cuda") is block_adam_multi_update_
        assert resolve("micro_adam", "auto", "cpu").__name__ == "micro_adam_update_"
    finally:
        backends._resolve.cache_clear()


def test_invalid_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="Invalid backend 'gpu'; choose one of 'auto', 'torch'"):
        resolve("block_adam", "gpu", "cpu")
    with pytest.raises(ValueError, match="Invalid backend 'auto' to register"):
        register("block_adam", "auto", "x:y")
    with pytest.raises(ValueError, match="There is no Triton kernel for 'scratch2'"):
        backends.IMPLEMENTATIONS["scratch2"] = {"torch": backends.Implementation("x:y")}
        try:
            resolve("scratch2", "triton", "cuda")
        finally:
            del backends.IMPLEMENTATIONS["scratch2"]
    assert BACKENDS == ("auto", "torch", "compile", "triton", "native")
