"""Build and load the package's C kernels for CPUs: compiled once per machine, then cached.

The kernels in ``kernels/csrc`` are plain C (no Python or PyTorch headers), so building one takes
about a second with the C compiler that ``torch.compile`` needs on CPUs anyway (``$CC``, else
``cc``, ``gcc`` or ``clang``). The shared library is built for the host CPU (``-march=native``) and
cached under ``$LIGHTNING_LOWMEM_CACHE`` (default ``~/.cache/lightning_lowmem``), keyed by the
source, the compiler, the flags and the CPU, so a home directory shared by different machines
never loads a library built for another CPU. Concurrent builds (several ranks) are safe: each
writes its own file and renames it into place.

Example::

    >>> lib = load_library("block_adam_rows")     # None where no C compiler works
    >>> lib is None or lib.lowmem_block_adam_rows_abi() == 1
    True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"

#: Tried in order: the first set the compiler accepts is used.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"),
    ("-O3", "-fno-math-errno", "-shared", "-fPIC"),
)


def cache_dir() -> Path:
    """Where built libraries are kept: ``$LIGHTNING_LOWMEM_CACHE`` or ``~/.cache/lightning_lowmem``."""
    root = os.environ.get("LIGHTNING_LOWMEM_CACHE") or Path.home() / ".cache" / "lightning_lowmem"
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """The shared library built from ``csrc/<name>.c``, or ``None`` (logged) if it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        log.info("No C compiler found ($CC, cc, gcc, clang); the C kernel %s is not available.", name)
        return None
    source = SOURCE_DIR / f"{name}.c"
    errors = []
    for flags in FLAG_SETS:
        target = cache_dir() / f"{name}-{_build_key(source, compiler, flags)}.so"
        try:
            if not target.exists():
                _build(source, target, compiler, flags)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(f"{' '.join(flags)}: {_describe(err)}")
    log.info("Building the C kernel %s with %s failed; it is not available.\n%s", name, compiler, "\n".join(errors))
    return None


def _build(source: Path, target: Path, compiler: str, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", partial, "-lm"], check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


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


def _describe(err: Exception) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        return (err.stderr or "").strip().splitlines()[-1:][0] if err.stderr else f"exit status {err.returncode}"
    return str(err)
