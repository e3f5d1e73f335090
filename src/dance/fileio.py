"""Atomic writes: a crash mid-write never leaves a half-written checkpoint, cache or report."""
from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from dance.errors import WriteError
from dance.faults import fault_point


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames and new files of ``folder`` durable (a power cut after a rename could
    otherwise lose it). A file system without directory fsync is left as it is."""
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


def write_file_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write a new file and fsync it (the caller swaps its folder in, see checkpoints). A failed
    write is a WriteError naming the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})", e.errno, str(path),
                         e.strerror) from None


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put back at once
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: umask is per process, and setting it races


def _new_mode(path: Path) -> int:
    """The mode a rewritten file keeps, or a new file gets from the umask (0644 under the usual
    022), as ``open`` would give it; ``mkstemp`` alone makes every file 0600."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temp file in the same folder and a rename,
    so ``path`` is either its old self or complete. A failed write (disk full, read-only) is a
    WriteError naming ``path``; the temp file is removed and the old ``path`` is left intact."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, _new_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("atomic-write")
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        _unlink_quietly(tmp)
        if isinstance(e, WriteError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise WriteError(f"{path}: cannot write ({e.strerror or e}); {kept}", e.errno,
                         str(path), e.strerror) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, through nested dicts,
    lists and tuples (tuples become lists), so it dumps as strict JSON (null, not NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
