"""Which implementation runs an update: the table of backends and THE function that chooses.

Every update (an *op*: ``"block_adam"`` for AdamMini/Eve and the dense tensors of MicroAdam,
``"micro_adam"`` for MicroAdam's compressed tensors) has a PyTorch reference, and backends
register other implementations of it with the same signature and result (:func:`register`).
:func:`resolve` is the one place where a ``backend`` string becomes a function; the optimizers'
functional APIs call it and never branch on backends themselves:

* ``"torch"``: the reference, eagerly (with every block ``full``, bit-for-bit the arithmetic of
  ``torch.optim.AdamW``'s single-tensor path);
* ``"compile"``: the reference under ``torch.compile`` (:mod:`.compiled`): 0-dim tensor scalars, so
  a scheduler or a growing step count does not recompile; where compilation fails, the reference
  runs instead, after ONE warning; ``"torch"`` where ``torch.compile`` is not supported at all;
* ``"triton"``: the op's Triton kernels, for CUDA tensors (or CPU tensors under
  ``TRITON_INTERPRET=1``, slowly, for tests). Triton is imported only when this is chosen; an op
  without Triton kernels or a missing ``triton`` package is an error;
* ``"native"``: for CPU tensors, the package's C kernel where the op has one (``block_adam``,
  fp32 tensors; built with the system C compiler at first use, :mod:`.native`), ``"compile"`` for
  the tensors and ops it does not take. Where the kernel cannot be built, ``"compile"`` runs
  instead, after ONE warning with the compiler's message;
* ``"auto"``: ``"triton"`` for CUDA tensors where the op has kernels and ``triton`` imports,
  ``"native"`` for CPU tensors where the C kernel builds, ``"compile"`` otherwise. A C kernel that
  fails to build is reported once (a warning with the compiler's message); no compiler at all,
  or ``LIGHTNING_LOWMEM_NATIVE=0``, only in the log.

Example::

    >>> update = resolve("block_adam", "auto", torch.device("cpu"))
    >>> update(params, grads, exp_avgs, exp_avg_sqs, layouts, mean_sqs, lr=1e-3, step_size=1e-2,
    ...        bias_correction2_sqrt=0.03, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from lightning_lowmem.kernels.compiled import compile_supported

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "compile", "triton", "native")


class Unavailable(NamedTuple):
    """Why an implementation cannot run here; ``failed``: something was tried and broke (a
    compiler error), as opposed to something absent (no compiler, switched off, not installed)."""

    reason: str
    failed: bool = False


class Implementation(NamedTuple):
    """A registered implementation of an op.

    Args:
        target: ``"module:function"``, imported when the implementation is first chosen.
        devices: the device types ``"auto"`` picks it for (``None``: any); an explicit
            ``"triton"`` ignores this (its kernels also run on CPUs under ``TRITON_INTERPRET=1``).
        check: ``"module:function"`` returning an :class:`Unavailable` where it cannot run here,
            ``None`` where it can (imported and called when ``"auto"`` or the backend asks).
    """

    target: str
    devices: tuple[str, ...] | None = None
    check: str | None = None


#: op -> backend -> implementation. ``"auto"`` is not a backend of its own: :func:`resolve` picks.
IMPLEMENTATIONS: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, target: str, *, devices: tuple[str, ...] | None = None,
             check: str | None = None) -> None:
    """Register ``target`` (``"module:function"``) as ``backend``'s implementation of ``op``.

    The ``"native"`` implementation is called with ``rest=``, the implementation for the tensors
    it does not take.

    Example::

        >>> register("block_adam", "triton", "my_package.kernels:block_adam_triton_", devices=("cuda",))
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"Invalid backend {backend!r} to register; choose one of {BACKENDS[1:]}.")
    IMPLEMENTATIONS.setdefault(op, {})[backend] = Implementation(target, devices, check)
    _resolve.cache_clear()


def check_backend(backend: str) -> None:
    """Raise a ValueError naming the valid backends."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}.")


def resolve(op: str, backend: str, device: torch.device | str) -> Callable[..., None]:
    """The function that runs ``op`` on tensors of ``device`` under ``backend`` (see the module docstring).

    Resolved once per ``(op, backend, device type)``; fallbacks are reported once.

    Raises:
        ValueError: an unknown backend or op, or ``"triton"`` for an op without Triton kernels.
        RuntimeError: ``"triton"`` where ``triton`` cannot be imported.
    """
    return _resolve(op, backend, torch.device(device).type)


@functools.cache
def _resolve(op: str, backend: str, device_type: str) -> Callable[..., None]:
    check_backend(backend)
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown op {op!r}; registered: {', '.join(map(repr, IMPLEMENTATIONS))}.")
    chosen = _choose(op, backend, device_type)
    fn = _load(IMPLEMENTATIONS[op][chosen].target)
    if chosen == "native":
        return functools.partial(fn, rest=_resolve(op, "compile", device_type))
    return fn


def _choose(op: str, backend: str, device_type: str) -> str:
    implementations = IMPLEMENTATIONS[op]
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if "triton" not in implementations:
            raise ValueError(f"There is no Triton kernel for {op!r}; choose backend 'auto', 'torch' or 'compile'.")
        unavailable = _unavailable(implementations["triton"])
        if unavailable is not None:
            raise RuntimeError(f"backend='triton' cannot run: {unavailable.reason}; choose backend 'auto', 'torch' or 'compile'.")
        return "triton"
    if backend in ("auto", "native"):
        for fast in ("native",) if backend == "native" else ("triton", "native"):
            implementation = implementations.get(fast)
            if implementation is None or (implementation.devices and device_type not in implementation.devices):
                continue
            unavailable = _unavailable(implementation)
            if unavailable is None:
                return fast
            _report(f"The {fast} kernel for {op!r} cannot be used here: {unavailable.reason}\n"
                    f"backend={backend!r} runs 'compile' instead ({_hint(fast)}).",
                    warn=backend == fast or unavailable.failed)
    return "compile" if compile_supported() else "torch"


def _hint(backend: str) -> str:
    if backend == "native":
        from lightning_lowmem.kernels.native import SWITCH_OFF_HINT

        return SWITCH_OFF_HINT
    return "pass backend='compile' to switch it off"


def _unavailable(implementation: Implementation) -> Unavailable | None:
    return None if implementation.check is None else _load(implementation.check)()


def _load(target: str) -> Callable[..., object]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _report(message: str, warn: bool) -> None:
    """A RuntimeWarning (``warn``) or an info log line, once per message."""
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=5)
    else:
        log.info(message)


@functools.cache
def triton_unavailable() -> Unavailable | None:
    """Why Triton cannot run here (``import triton`` fails), ``None`` where it can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return Unavailable(f"the `triton` package cannot be imported ({err}); install it (pip install triton)")
    return None


def native_unavailable() -> Unavailable | None:
    """Why the C kernel for CPUs cannot run here, ``None`` where it can (it is built on first call)."""
    from lightning_lowmem.kernels.block_adam_cpu import rows_kernel_build

    build = rows_kernel_build()
    return None if build.library is not None else Unavailable(build.problem or "it did not load", build.failed)


_HERE = "lightning_lowmem.kernels"
register("block_adam", "torch", f"{_HERE}.block_adam:block_adam_multi_update_")
register("block_adam", "compile", f"{_HERE}.block_adam:block_adam_compiled_")
register("block_adam", "triton", f"{_HERE}.block_adam_triton:block_adam_multi_update_triton_", devices=("cuda",),
         check=f"{_HERE}.backends:triton_unavailable")
register("block_adam", "native", f"{_HERE}.block_adam_native:block_adam_native_", devices=("cpu",),
         check=f"{_HERE}.backends:native_unavailable")
# the momentum formats of AdamMini/Eve (bf16, int8, int4) and bf16 parameters with stochastic rounding;
# "compile" is the reference under torch.compile; "native" and "triton" are the fused passes
register("block_adam_quantized", "torch", f"{_HERE}.block_adam_quantized:block_adam_quantized_multi_update_")
register("block_adam_quantized", "compile", f"{_HERE}.block_adam_quantized:block_adam_quantized_compiled_")
register("block_adam_quantized", "triton", f"{_HERE}.block_adam_quantized_triton:block_adam_quantized_triton_",
         devices=("cuda",), check=f"{_HERE}.backends:triton_unavailable")
register("block_adam_quantized", "native", f"{_HERE}.block_adam_quantized_native:block_adam_quantized_native_",
         devices=("cpu",), check=f"{_HERE}.block_adam_quantized_native:quantized_kernel_unavailable")
register("micro_adam", "torch", f"{_HERE}.micro_adam:micro_adam_update_")
register("micro_adam", "compile", f"{_HERE}.micro_adam:micro_adam_update_compiled_")
register("micro_adam", "triton", f"{_HERE}.micro_adam_triton:micro_adam_update_triton_", devices=("cuda",),
         check=f"{_HERE}.backends:triton_unavailable")
