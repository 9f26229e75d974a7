"""Backend choice for the per-tensor optimizer updates.

Every update exists once as a pure PyTorch function (the reference). A backend decides how it runs:

* ``"torch"``: the reference, eagerly, with Python-number hyperparameters (bit-for-bit the
  arithmetic of ``torch.optim``'s single-tensor path);
* ``"compile"``: the same function under ``torch.compile``, called with 0-dim tensors for the
  learning rate and step so that a scheduler or a growing step count does not recompile; if
  compilation fails (no C compiler, an unsupported platform) the reference runs instead, after ONE
  warning;
* ``"triton"``: the update's Triton twin (same signature, same result), for updates that have
  one (MicroAdam). It needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before
  the kernels are first imported (slow: for tests). Triton is imported only when this is chosen;
* ``"native"``: for AdamMini/Eve on CPUs, the package's C kernel for fp32 tensors (one pass
  over memory; built with the system C compiler on first use, see
  :mod:`lightning_lowmem.kernels.native`), ``"compile"`` for the other tensors and updates. Where
  the kernel cannot be built, ``"compile"`` runs instead, after ONE warning;
* ``"auto"``: ``"triton"`` for CUDA tensors when the update has a Triton twin and ``triton``
  imports; on CPUs ``"native"`` where the C kernel builds; otherwise ``"compile"`` where it is
  supported, else ``"torch"``.

Example::

    >>> update, wants_tensors = resolve_update(block_adam_update_, "auto")
    >>> update, wants_tensors = resolve_update(micro_adam_update_, "auto", triton=micro_adam_update_triton_,
    ...                                        device=param.device)
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "compile", "triton", "native")

#: Compiled graphs per update function (one per distinct parameter shape and layout) before dynamo
#: stops recompiling and runs eagerly.
_MAX_GRAPHS = 64


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    """Raise a ValueError naming the valid backends (``allowed``: those an optimizer supports)."""
    if backend not in allowed:
        raise ValueError(f"Invalid backend {backend!r}; choose one of {', '.join(map(repr, allowed))}.")


def resolve_update(
    fn: Callable[..., None],
    backend: str,
    *,
    triton: Callable[..., None] | None = None,
    device: torch.device | None = None,
) -> tuple[Callable[..., None], bool]:
    """The callable that runs ``fn`` on ``backend`` and whether it takes tensor scalars.

    Args:
        fn: the reference update.
        backend: one of :data:`BACKENDS`.
        triton: ``fn``'s Triton twin, if it has one.
        device: the device of the tensors to update; ``"auto"`` picks Triton only for CUDA.

    Raises:
        ValueError: ``backend="triton"`` for an update without a Triton twin.
        RuntimeError: ``backend="triton"`` when ``triton`` cannot be imported.
    """
    check_backend(backend)
    if backend == "triton":
        if triton is None:
            raise ValueError(
                f"There is no Triton kernel for {fn.__name__}; choose backend 'auto', 'torch' or 'compile'."
            )
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the `triton` package, which cannot be imported here; "
                "install it (pip install triton) or choose backend 'auto', 'torch' or 'compile'."
            )
        return triton, False
    if backend == "auto" and triton is not None and device is not None and device.type == "cuda" and triton_available():
        return triton, False
    if backend == "torch" or (backend in ("auto", "native") and not _compile_supported()):
        return fn, False
    return _compiled(fn), True


def rows_kernel_wanted(backend: str, device: torch.device) -> bool:
    """Whether AdamMini/Eve tensors on ``device`` take the C kernel under ``backend``.

    ``"native"`` warns once where the kernel cannot be built (no C compiler), ``"auto"`` says so
    once in the log; both then run ``"compile"``.
    """
    if backend not in ("auto", "native") or device.type != "cpu":
        return False
    from lightning_lowmem.kernels.block_adam_cpu import rows_kernel_available

    if rows_kernel_available():
        return True
    _say_once(
        "The C kernel for AdamMini/Eve rows cannot be built here (no working C compiler: set $CC); "
        f"backend={backend!r} runs 'compile' instead. Pass backend='compile' to silence this.",
        warn=backend == "native",
    )
    return False


@functools.cache
def _say_once(message: str, warn: bool) -> None:
    """A RuntimeWarning (``warn``) or an info log line, once per message."""
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    else:
        log.info(message)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (imported here, lazily, on first call)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compile_supported() -> bool:
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


class _CompiledWithFallback:
    """``torch.compile(fn)`` that switches to eager ``fn`` for good after a failed compilation."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            try:
                # one static graph per parameter shape: dynamic shapes make Inductor's CPU code
                # several times slower, and a model has more distinct shapes than the default limit
                with torch._dynamo.config.patch(recompile_limit=_MAX_GRAPHS, accumulated_recompile_limit=4 * _MAX_GRAPHS):
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
