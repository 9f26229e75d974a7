"""The file steps of a save by ``LowMemFSDPStrategy``; the strategy runs them on the right ranks.

A sharded checkpoint: rank 0 runs :func:`prepare`; every rank writes its shards into the partial
directory and hashes the files :func:`written_by` it; rank 0 gathers the hashes and runs
:func:`finish_directory` (marker last, then the rename). A single file: rank 0 runs :func:`prepare`
and :func:`write_file`.

Example::

    >>> prepare(path, directory=False)
    >>> write_file(checkpoint, path)      # complete under `path`, or `path` unchanged
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lightning_lowmem.strategies.atomic import clean_leftovers, fsync, partial_path, publish, reached
from lightning_lowmem.strategies.integrity import LIGHTNING_METADATA, MARKER_NAME, file_entries, write_marker


def prepare(path: Path, directory: bool) -> None:
    """Remove what an interrupted save of ``path`` left, and create the empty partial directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    if directory:
        partial_path(path).mkdir()


def is_checkpoint_directory(path: Path) -> bool:
    """Whether the directory ``path`` is a sharded checkpoint (so a save may replace it)."""
    return (path / MARKER_NAME).is_file() or (path / LIGHTNING_METADATA).is_file()


def written_by(directory: Path, rank: int) -> list[str]:
    """The files of a sharded checkpoint this rank wrote (``__<rank>_*``; rank 0 also the shared ones)."""
    own = []
    for file in directory.iterdir():
        writer = file.name[2:].split("_", 1)[0] if file.name.startswith("__") else None
        if file.is_file() and (writer == str(rank) or (rank == 0 and not (writer or "").isdigit())):
            own.append(file.name)
    return sorted(own)


def finish_directory(partial: Path, path: Path, files: dict[str, Any]) -> None:
    """Rank 0: hash the files no rank listed, write the completion marker, rename into place."""
    present = {f.name for f in partial.iterdir() if f.is_file()}
    unlisted = sorted(present - files.keys())
    if unlisted:
        files = {**files, **file_entries(partial, unlisted)}
    write_marker(partial, files)
    fsync(partial)
    reached("marked", path)
    publish(partial, path)


def write_file(checkpoint: dict[str, Any], path: Path) -> None:
    """Rank 0: ``torch.save`` to the partial file (every record with its CRC32), flush, rename into place."""
    from torch.utils.serialization import config

    partial = partial_path(path)
    crc, config.save.compute_crc32 = config.save.compute_crc32, True
    try:
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
    finally:
        config.save.compute_crc32 = crc
    reached("written", path)
    reached("marked", path)
    publish(partial, path)
