"""Publish a checkpoint (a file or a directory) under its final name only once it is complete.

A checkpoint is written under a temporary name beside its final path (same directory, so the same
filesystem and a rename that cannot copy), then renamed into place:

* ``.NAME.partial``: the checkpoint being written. A save that is killed leaves it behind; the next
  save of ``NAME`` removes it. Lightning's ``ModelCheckpoint`` never takes it for a checkpoint (its
  name does not end in ``.ckpt``).
* ``.NAME.old``: a previous ``NAME`` set aside by :func:`publish` or :func:`discard` until it is deleted.

:func:`publish` replaces an existing ``NAME`` with one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux
(directories cannot be renamed over a non-empty directory), so ``NAME`` is at every instant either
the old complete checkpoint or the new complete one. Where the exchange is not available (another
OS, a filesystem without it) a file is still replaced atomically (``os.replace``); a directory is
moved aside, then the new one renamed in, and for the moment between the two renames ``NAME`` does
not exist (the old one is complete under ``.NAME.old``).

:data:`STAGE_HOOKS` are called at each stage of a save with the stage's name and the final path;
fault-injection tests use them to stop a save at a chosen point.

Example::

    >>> partial = partial_path(Path("ckpts/last.ckpt"))   # ckpts/.last.ckpt.partial
    >>> torch.save(state, partial)
    >>> publish(partial, Path("ckpts/last.ckpt"))
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Called as ``hook(stage, final_path)`` at each stage of a save, on every rank that reaches it.
#: Stages: ``"started"`` (the partial path is empty), ``"written"`` (everything but the completion
#: marker is written), ``"marked"`` (complete under the partial name), ``"replaced"`` (the new
#: checkpoint is under its final name, the previous one not yet deleted).
STAGE_HOOKS: list[Callable[[str, Path], None]] = []

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def partial_path(path: Path) -> Path:
    """Where the checkpoint ``path`` is written before :func:`publish` renames it."""
    return path.with_name(f".{path.name}.partial")


def old_path(path: Path) -> Path:
    """Where a previous ``path`` waits for deletion after it was replaced or discarded."""
    return path.with_name(f".{path.name}.old")


def reached(stage: str, path: Path) -> None:
    """Run :data:`STAGE_HOOKS` for ``stage`` of the save of ``path``."""
    for hook in STAGE_HOOKS:
        hook(stage, path)


def remove(path: Path) -> None:
    """Delete a file, a link or a directory tree at ``path`` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_leftovers(path: Path) -> None:
    """Delete what a killed save or removal of ``path`` left behind (its partial and old copies)."""
    for leftover in (partial_path(path), old_path(path)):
        if leftover.exists() or leftover.is_symlink():
            log.info("Removing %s, left by an interrupted save of %s.", leftover, path)
            remove(leftover)


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, path: Path) -> None:
    """Rename the complete checkpoint ``partial`` to ``path``, replacing a previous one atomically.

    The previous checkpoint is deleted only after the new one is in place.
    """
    if not (path.exists() or path.is_symlink()):
        os.rename(partial, path)
    elif _exchange(partial, path):
        pass  # the previous checkpoint is now at `partial`
    elif partial.is_file() and path.is_file():
        os.replace(partial, path)
    else:
        os.rename(path, old_path(path))
        os.rename(partial, path)
        partial = old_path(path)
    fsync(path.parent)
    reached("replaced", path)
    if partial.exists() or partial.is_symlink():
        remove(partial)


def discard(path: Path) -> None:
    """Delete the checkpoint ``path``: renamed aside first, so no half-deleted checkpoint keeps its name."""
    if not (path.exists() or path.is_symlink()):
        return
    aside = old_path(path)
    remove(aside)
    os.rename(path, aside)
    remove(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; ``False`` where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        log.debug("renameat2(RENAME_EXCHANGE) is not supported for %s (errno %d).", b, err)
        return False
    raise OSError(err, f"Cannot exchange {a} and {b}: {os.strerror(err)}")
