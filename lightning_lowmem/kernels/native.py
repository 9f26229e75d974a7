"""Build and load the package's C kernels for CPUs: compiled once per machine, then cached.

The kernels in ``kernels/csrc`` are plain C (no Python or PyTorch headers), so building one takes
about a second with the C compiler that ``torch.compile`` needs on CPUs anyway (``$CC``, else
``cc``, ``gcc`` or ``clang``). The shared library is built for the host CPU (``-march=native``) and
cached under ``$LIGHTNING_LOWMEM_CACHE`` (default ``~/.cache/lightning_lowmem``), keyed by the
source, the compiler, the flags and the CPU, so a home directory shared by different machines
never loads a library built for another CPU. Concurrent builds (several ranks) are safe: each
writes its own file and renames it into place.

A build never raises: a missing compiler, a compiler that fails or one that runs longer than
``$LIGHTNING_LOWMEM_BUILD_TIMEOUT`` seconds (default 120; it is killed with its child processes)
gives a :class:`Build` without a library that says why, in the compiler's own words, and the
result is kept for the process, so a failed build is not retried at every step.
``LIGHTNING_LOWMEM_NATIVE=0`` switches the C kernels off without trying. ``lowmem build-kernels``
builds them ahead of time (:func:`build_all`).

Example::

    >>> build = build_library("block_adam_rows")
    >>> build.library is not None or print(build.problem)   # the compiler's message where it failed
    True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

SOURCE_DIR = Path(__file__).parent / "csrc"

#: Set to ``0`` to switch the C kernels off (``"auto"`` then runs ``"compile"`` on CPUs).
ENV_SWITCH = "LIGHTNING_LOWMEM_NATIVE"
#: Seconds a compiler may run before the build counts as failed.
ENV_TIMEOUT = "LIGHTNING_LOWMEM_BUILD_TIMEOUT"
_DEFAULT_TIMEOUT_S = 120.0

#: Tried in order: the first set the compiler accepts is used.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"),
    ("-O3", "-fno-math-errno", "-shared", "-fPIC"),
)

#: How to switch the C kernels off, for messages.
SWITCH_OFF_HINT = f"set {ENV_SWITCH}=0 or pass backend='compile' to switch it off"


class Build(NamedTuple):
    """The outcome of building one kernel.

    Args:
        library: the loaded library, or ``None``.
        path: where the library is (or would be) cached.
        problem: why there is no library: the compiler's own message, or what was missing.
        failed: a compiler was there and failed or hung (as opposed to: none found, switched off).
    """

    library: ctypes.CDLL | None
    path: Path | None
    problem: str | None = None
    failed: bool = False


class BuildError(RuntimeError):
    """A compiler run that failed or timed out; the message is the compiler's own."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$LIGHTNING_LOWMEM_CACHE`` or ``~/.cache/lightning_lowmem``."""
    root = os.environ.get("LIGHTNING_LOWMEM_CACHE") or Path.home() / ".cache" / "lightning_lowmem"
    return Path(root) / "kernels"


def switched_off() -> bool:
    """Whether ``$LIGHTNING_LOWMEM_NATIVE`` switches the C kernels off (``0``, ``false``, ``off``, ``no``)."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "off", "no")


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def kernel_names() -> list[str]:
    """The C kernels of the package (one per ``csrc/*.c``)."""
    return sorted(path.stem for path in SOURCE_DIR.glob("*.c"))


@functools.cache
def build_library(name: str) -> Build:
    """Build (or find in the cache) and load ``csrc/<name>.c``; once per process, never raises."""
    if switched_off():
        return Build(None, None, f"switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    compiler = find_compiler()
    if compiler is None:
        wanted = f"$CC={os.environ['CC']!r} is not on the PATH" if os.environ.get("CC") else "no C compiler found (cc, gcc, clang)"
        return Build(None, None, f"{wanted}; set $CC to one")
    source = SOURCE_DIR / f"{name}.c"
    errors = []
    target = None
    for flags in FLAG_SETS:
        target = cache_dir() / f"{name}-{_build_key(source, compiler, flags)}.so"
        try:
            if not target.exists():
                _build(source, target, compiler, flags)
            return Build(ctypes.CDLL(str(target)), target)
        except (OSError, BuildError) as err:
            errors.append(f"{compiler} {' '.join(flags)}: {err}")
    return Build(None, target, "\n".join(errors), failed=True)


def build_all() -> dict[str, Build]:
    """Build every C kernel of the package now (``lowmem build-kernels``)."""
    return {name: build_library(name) for name in kernel_names()}


def _timeout_s() -> float:
    try:
        return float(os.environ.get(ENV_TIMEOUT, _DEFAULT_TIMEOUT_S))
    except ValueError:
        return _DEFAULT_TIMEOUT_S


def _build(source: Path, target: Path, compiler: str, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        _run([compiler, *flags, str(source), "-o", partial, "-lm"], _timeout_s())
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _run(command: list[str], timeout: float) -> None:
    """Run a compiler; raise :class:`BuildError` with its last lines of output if it fails or hangs.

    It runs in its own process group, so a timeout kills whatever it started too (a compiler
    driver's children would otherwise keep its output pipe open).
    """
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise BuildError(f"did not finish within {timeout:g} s (${ENV_TIMEOUT} sets the limit)") from None
    if process.returncode != 0:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        raise BuildError("\n".join(lines[-5:]) or f"exit status {process.returncode}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):  # no process groups, or already gone
        process.kill()


def _build_key(source: Path, compiler: str, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for part in (compiler, " ".join(flags), platform.machine(), _cpu_identity()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_identity() -> str:
    """The CPU's model and feature flags where the OS tells them (what ``-march=native`` depends on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
