"""Atomic file writes: a temporary file in the same folder, fsync, then os.replace and an fsync
of the folder, so an interrupted write never leaves a partial file behind and a power cut
cannot lose the rename."""
from __future__ import annotations

import glob
import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_directory(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (a rename into it) durable.  A no-op where directories
    cannot be opened or fsynced (Windows, some network filesystems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_as(path: Path, previous: Path) -> None:
    """Make ``previous`` name the file now at ``path``, atomically: a hard link moved into place,
    so both names hold a complete file at every moment.  Where hard links are unsupported,
    ``path`` is renamed instead (until the caller's own rename, only ``previous`` exists)."""
    link = path.parent / f".{path.name}.{secrets.token_hex(4)}.prev.tmp"  # (remove_stale_temporaries(path))
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 previous: str | os.PathLike | None = None) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path`` and move it into place.  With
    ``previous``, the file that ``path`` held (if any) is kept under that name (in the same
    folder), once the new one is completely written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        if previous is not None and path.is_file():
            _keep_as(path, Path(previous))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_write(path, ...)`` leaves behind when its
    process is killed mid-write (call before writing ``path`` again; one writer per path)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
