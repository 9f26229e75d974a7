"""Is a checkpoint complete and intact? Checksums written at save time, checked at load time.

* A sharded checkpoint (a directory of ``torch.distributed.checkpoint`` files and Lightning's
  ``meta.pt``) is complete when it holds :data:`MARKER_NAME`, written last, which lists every file
  with its size and CRC32. :func:`checkpoint_problems` compares the files against it.
* A single-file checkpoint is a ``torch.save`` zip archive: torch writes each record's CRC32 in the
  archive and its directory at the very end, so a truncated file has no directory and a changed
  byte fails its record's CRC32 (``torch.load`` itself checks neither when it memory-maps the file).

A directory without the marker is refused: it is what a killed save leaves. A checkpoint written by
Lightning's ``ModelParallelStrategy`` (or an older ``lightning_lowmem``) has none either; if you know
it is complete, :func:`mark_complete` writes the marker for the files it holds now.

The checks of one checkpoint can be split between processes (``rank``/``world``): each reads a
share of the files (of the records, for one file), so a load reads every byte once in all.

Example::

    >>> verify_checkpoint("ckpts/last.ckpt")   # raises CheckpointError naming what is wrong
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

from lightning_lowmem.strategies.atomic import old_path, partial_path

#: The completion marker of a sharded checkpoint, written after every other file.
MARKER_NAME = "lowmem_complete.json"
#: Lightning's metadata file in a sharded checkpoint (everything but weights and optimizer state).
LIGHTNING_METADATA = "meta.pt"
#: ``torch.distributed.checkpoint``'s index of the shards.
DCP_METADATA = ".metadata"
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, damaged, or written for another model or optimizer."""


def crc32(path: Path) -> str:
    """The CRC32 of a file's bytes, as 8 hex digits."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``name -> {"bytes": size, "crc32": hex}`` of files of ``directory``, for :func:`write_marker`."""
    return {name: {"bytes": (directory / name).stat().st_size, "crc32": crc32(directory / name)} for name in names}


def write_marker(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write :data:`MARKER_NAME` listing ``files`` (flushed to disk): the directory is then complete."""
    marker = directory / MARKER_NAME
    with open(marker, "w") as f:
        json.dump({"format": 1, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problems(path: str | os.PathLike, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with the checkpoint ``path`` (empty if nothing), reading this rank's share of the bytes.

    Every rank finds the structural problems (missing files, sizes); the contents are split.
    """
    path = Path(path)
    if path.is_dir():
        if (path / MARKER_NAME).is_file():
            return _marked_directory_problems(path, rank, world)
        return _unmarked_directory_problems(path)
    if path.is_file():
        return _file_problems(path, rank, world)
    return [_missing(path)]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if the checkpoint ``path`` (file or directory) is incomplete or damaged.

    Reads every byte of the checkpoint once.

    Example::

        >>> verify_checkpoint("ckpts/epoch=3-step=400.ckpt")
    """
    problems = checkpoint_problems(path)
    if problems:
        raise checkpoint_error(Path(path), problems)


def checkpoint_error(path: Path, problems: list[str]) -> CheckpointError:
    """The error for the ``problems`` of ``path``, with what to do."""
    listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return CheckpointError(
        f"Cannot load the checkpoint {str(path)!r}: {listed}. An incomplete checkpoint comes from a save that was "
        "interrupted; a damaged one changed after it was written (disk, copy or transfer error). Resume from "
        "another checkpoint (e.g. an earlier epoch's)."
    )


def _missing(path: Path) -> str:
    hints = []
    if partial_path(path).exists():
        hints.append(f"only {partial_path(path).name}, the leftover of an interrupted save, is there")
    if old_path(path).exists():
        hints.append(f"its previous version, complete, is at {old_path(path).name} (rename it back)")
    return "it does not exist" + (f" ({'; '.join(hints)})" if hints else "")


def _marked_directory_problems(path: Path, rank: int, world: int) -> list[str]:
    try:
        files: dict[str, dict[str, Any]] = json.loads((path / MARKER_NAME).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"its completion marker {MARKER_NAME} is damaged ({e})"]
    problems = []
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, {entry['bytes']} were written")
    if problems:
        return problems
    for i, (name, entry) in enumerate(sorted(files.items())):
        if i % world == rank and crc32(path / name) != entry["crc32"]:
            problems.append(f"{name} is damaged (CRC32 {crc32(path / name)}, {entry['crc32']} when written)")
    return problems


def mark_complete(path: str | os.PathLike) -> None:
    """Write the completion marker of a sharded checkpoint written without one, for the files it holds now.

    For a directory written by Lightning's ``ModelParallelStrategy`` or an older ``lightning_lowmem``
    that you know to be complete: nothing can check its contents from before.

    Raises:
        CheckpointError: if a file its ``.metadata`` refers to is missing or too short.

    Example::

        >>> mark_complete("old_ckpts/epoch=3-step=400.ckpt")
    """
    path = Path(path)
    missing = [name for name in (DCP_METADATA, LIGHTNING_METADATA) if not (path / name).is_file()]
    missing = missing or _missing_shards(path)
    if missing:
        raise checkpoint_error(path, [f"{', '.join(missing)} missing"])
    write_marker(path, file_entries(path, sorted(f.name for f in path.iterdir() if f.is_file())))


def _unmarked_directory_problems(path: Path) -> list[str]:
    missing = [name for name in (DCP_METADATA, LIGHTNING_METADATA) if not (path / name).is_file()]
    missing = missing or _missing_shards(path)
    what = f"{', '.join(missing)} missing" if missing else "its files all present"
    return [
        f"it is incomplete: it has no completion marker {MARKER_NAME} ({what}). A save that was interrupted leaves "
        "such a directory; so do Lightning's ModelParallelStrategy and older lightning_lowmem versions: if you know it "
        "is complete, run lightning_lowmem.strategies.mark_complete(path) once"
    ]


def _missing_shards(path: Path) -> list[str]:
    """Shard files that ``.metadata`` refers to and that are missing or too short."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable index means the directory is incomplete
        return [f"a readable {DCP_METADATA} ({type(e).__name__}: {e})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    return [
        f"{name} ({'absent' if not (path / name).is_file() else f'{(path / name).stat().st_size} of {size} bytes'})"
        for name, size in sorted(needed.items())
        if not (path / name).is_file() or (path / name).stat().st_size < size
    ]


def _file_problems(path: Path, rank: int, world: int) -> list[str]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return [f"it is incomplete or not a torch.save file ({path.stat().st_size} bytes, no archive directory at its end)"]
    problems = []
    with archive:
        for i, info in enumerate(archive.infolist()):
            if i % world != rank:
                continue
            try:
                with archive.open(info) as record:
                    while record.read(_CHUNK):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                problems.append(f"record {info.filename!r} is damaged ({e})")
    return problems
