"""``torch.compile`` of a reference update, falling back to eager only where compilation fails.

:func:`compiled` wraps an update function once (cached): one static graph per distinct set of
shapes and layouts, compiled whole (``fullgraph=True``, so a graph either compiles before any of it
runs or not at all). Three outcomes of a call:

* the graph compiles and runs: done;
* compilation fails (no C compiler for Inductor, an operator it cannot lower, a graph break): one
  ``RuntimeWarning`` with the compiler's message, then the eager function runs this call and every
  later one. Nothing of the update ran, so nothing is applied twice;
* the compiled update fails while it RUNS (out of memory, a shape error): the error propagates,
  as it would from the eager function.

Past :data:`MAX_GRAPHS` graphs per function, calls with yet another shape run eagerly.

Example::

    >>> update = compiled(block_adam_multi_update_)
    >>> update(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, **hparams)
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Compiled graphs per update function (one per distinct parameter shape and layout) before calls
#: with new shapes run eagerly.
MAX_GRAPHS = 64


@functools.cache
def compile_supported() -> bool:
    """Whether ``torch.compile`` can run here at all (Dynamo supports this Python and platform)."""
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


def compilation_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this graph could not be compiled" (as opposed to "it ran and failed").

    Dynamo's ``Unsupported`` (a graph break under ``fullgraph=True``) and ``BackendCompilerFailed``
    (Inductor's lowering or its C/C++ or Triton build failed; ``InductorError`` derives from it).
    """
    from torch._dynamo import exc

    return (exc.Unsupported, exc.BackendCompilerFailed)


def _limit_hit_error() -> type[BaseException] | None:
    from torch._dynamo import exc

    return getattr(exc, "FailOnRecompileLimitHit", None)


def recompile_limit_names(config: Any = None) -> tuple[str, str]:
    """The names of Dynamo's two recompile limits in this torch: ``recompile_limit`` and
    ``accumulated_recompile_limit``, called ``cache_size_limit`` and ``accumulated_cache_size_limit``
    before torch 2.7."""
    config = torch._dynamo.config if config is None else config
    if hasattr(config, "recompile_limit"):
        return "recompile_limit", "accumulated_recompile_limit"
    return "cache_size_limit", "accumulated_cache_size_limit"


@contextlib.contextmanager
def _graph_limits() -> Iterator[None]:
    per_function, accumulated = recompile_limit_names()
    with torch._dynamo.config.patch({per_function: MAX_GRAPHS, accumulated: 4 * MAX_GRAPHS}):
        yield


class CompiledWithFallback:
    """``torch.compile(fn, fullgraph=True)`` that runs ``fn`` eagerly, for good, after a compilation error."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        # one static graph per parameter shape: dynamic shapes make Inductor's CPU code several
        # times slower, and a model has more distinct shapes than the default limit
        self.compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return self.fn(*args, **kwargs)
        limit_hit = _limit_hit_error()
        try:
            with _graph_limits():
                return self.compiled(*args, **kwargs)
        except compilation_errors() as err:
            self.failed = True
            cause = getattr(err, "inner_exception", None) or err  # the compiler's own error
            message = str(cause).strip().splitlines()
            warnings.warn(
                f"torch.compile of {self.fn.__name__} failed ({type(cause).__name__}: {message[0] if message else ''}); "
                "running the eager reference from now on. Pass backend='torch' to switch compilation off.",
                RuntimeWarning,
                stacklevel=2,
            )
        except Exception as err:
            if limit_hit is None or not isinstance(err, limit_hit):
                raise
            # more shapes than MAX_GRAPHS: nothing ran; this shape stays eager
        return self.fn(*args, **kwargs)


@functools.cache
def compiled(fn: Callable[..., None]) -> CompiledWithFallback:
    """The compiled ``fn`` with its fallback, one per function (see the module docstring)."""
    return CompiledWithFallback(fn)
