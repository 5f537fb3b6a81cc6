"""Atomic file writes: a killed run never leaves a half-written file behind.

Every writer goes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX within one filesystem).
Temp files are named ``.<name>.<8 random characters>.tmp``; a write killed with ``kill -9`` leaves
one behind, which :func:`remove_stale_temps` deletes at the next start. An ``OSError`` raised while
writing (disk full, ...) names the destination file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, IO, Any, Iterator

from wtours.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a one-line :class:`UserError` if impossible."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory ({e.strerror or e})", path=p) from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError("output directory is not writable", path=p)
    return p


def check_output_file(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output file that could not be written: ``path`` is a directory, or its
    nearest existing ancestor is not a writable folder (missing folders are created when written)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{option}: is a directory; give a file name", path=p)
    up = p.parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise UserError(f"{option}: {up} is not a folder", path=p)
    if not os.access(up, os.W_OK | os.X_OK):
        raise UserError(f"{option}: folder {up} is not writable", path=p)
    return p


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside ``path``; on clean exit fsync and rename it to ``path``."""
    path = Path(path)
    ensure_dir(path.parent)
    if path.is_dir():  # else os.replace fails naming the temp file
        raise UserError("is a directory; give a file name", path=path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write here ({e.strerror or e})", path=path) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with _fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename and e.errno is not None:
            # writes to an open file raise without a file name ("No space left on device"): name it
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from None
        raise


_fdopen = os.fdopen  # the file object atomic_open writes to (tests replace it to simulate a full disk)
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temps(directory: str | Path, also: Callable[[Path], bool] | None = None) -> tuple[int, int]:
    """Delete the temp files :func:`atomic_open` left in ``directory`` (not recursive) when a write was
    killed -> ``(files, bytes)`` removed. Only names of its own pattern are touched, and those ``also`` accepts
    (e.g. another writer's temp files whose process is gone). Call it only while nothing else writes into
    ``directory`` (the start of a run)."""
    n = size = 0
    d = Path(directory)
    if not d.is_dir():
        return 0, 0
    for p in d.iterdir():
        if (_TEMP_RE.match(p.name) or (also is not None and also(p))) and p.is_file() and not p.is_symlink():
            try:
                sz = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            n, size = n + 1, size + sz
    return n, size


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False, default=_json_default)
        f.write("\n")
    return Path(path)


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temp file + rename.

    The object is serialised to memory first, then written: an error of the write itself (disk full,
    Ctrl-C) then surfaces as itself, not hidden in torch's ``RuntimeError: enforce fail``.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    with atomic_open(path, "wb") as f:
        for i in range(0, len(data), _CHUNK):
            f.write(data[i:i + _CHUNK])
    return Path(path)


_CHUNK = 64 << 20


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
