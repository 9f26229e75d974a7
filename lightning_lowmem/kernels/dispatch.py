"""Backend choice for the per-tensor optimizer updates.

Every update exists once as a pure PyTorch function (the reference). A backend decides how it runs:

* ``"torch"``: the reference, eagerly, with Python-number hyperparameters (bit-for-bit the
  arithmetic of ``torch.optim``'s single-tensor path);
* ``"compile"``: the same function under ``torch.compile``, called with 0-dim tensors for the
  learning rate and step so that a scheduler or a growing step count does not recompile; if
  compilation fails (no C compiler, an unsupported platform) the reference runs instead, after ONE
  warning;
* ``"auto"``: ``"compile"`` where it is supported, else ``"torch"``.

Example::

    >>> update, wants_tensors = resolve_update(block_adam_update_, "auto")
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "compile")


def check_backend(backend: str) -> None:
    """Raise a ValueError naming the valid backends."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}.")


def resolve_update(fn: Callable[..., None], backend: str) -> tuple[Callable[..., None], bool]:
    """The callable that runs ``fn`` on ``backend`` and whether it takes tensor scalars."""
    check_backend(backend)
    if backend == "torch" or (backend == "auto" and not _compile_supported()):
        return fn, False
    return _compiled(fn), True


@functools.cache
def _compile_supported() -> bool:
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


class _CompiledWithFallback:
    """``torch.compile(fn)`` that switches to eager ``fn`` for good after a failed compilation."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=None)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.failed = True
                warnings.warn(
                    f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: {err}); "
                    "running the eager reference from now on. Pass backend='torch' to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(*args, **kwargs)


@functools.cache
def _compiled(fn: Callable[..., None]) -> _CompiledWithFallback:
    return _CompiledWithFallback(fn)
