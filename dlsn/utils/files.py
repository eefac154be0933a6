"""Crash-safe file writing, strict JSON and a simple inter-process file lock (standard library only).

Every file this project writes for later reading (checkpoints, results, cache arrays, images, checksums)
goes through :func:`atomic_write`: readers see the old file or the complete new one, never a partial
one, whatever happens to the writer (exception, ``kill -9``, power loss after the call returned).

How (POSIX semantics; ``os.replace`` is also atomic on Windows):

1. ``tempfile.mkstemp`` in the *destination directory* (a rename is only atomic within one
   filesystem), with a unique name, so concurrent writers of the same file never share a temporary;
2. the caller's ``write_fn(file)`` fills it; it is flushed and ``fsync``-ed;
3. its permissions are set to what a plain ``open()`` would give: ``0o666 & ~umask``. ``mkstemp``
   creates files as ``0600``, which would hide checkpoints and results from teammates on shared
   cluster storage although their umask (e.g. ``022`` or ``002``) allows group/other read;
4. ``os.replace`` renames it over the destination, and the directory is fsynced (best effort) so
   that the rename itself survives a power loss.

If ``write_fn`` raises, the temporary file is removed and the destination is left untouched.

This module imports nothing beyond the standard library, so any layer (data workers, entry scripts,
tools without Hydra/Lightning) can use it cheaply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "NonFiniteJSONError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "file_lock",
    "strict_json_dumps",
    "write_json_strict",
]

log = logging.getLogger(__name__)

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where possible.

    Linux reports it in ``/proc/self/status`` (kernel >= 4.7). Elsewhere the only portable way is to
    set it and restore it at once, which is done under a lock (the umask is process-wide).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (best effort: not possible on Windows and some filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Any], None], mode: str = "wb",
                 encoding: str | None = None) -> Path:
    """Write ``path`` atomically: ``write_fn(file)`` fills a temporary file that replaces ``path``.

    Args:
        path: destination; its directory is created if missing.
        write_fn: called once with the open temporary file (binary for ``mode="wb"``, text for ``"w"``).
        mode: ``"wb"`` or ``"w"``.
        encoding: text encoding for ``mode="w"`` (default UTF-8).

    Returns the destination path. The final file has mode ``0o666 & ~umask`` (see module docstring).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text_encoding = (encoding or "utf-8") if mode == "w" else None
        with os.fdopen(fd, mode, encoding=text_encoding) as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~current_umask())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data), mode="wb")


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text), mode="w", encoding=encoding)


# ----------------------------------------------------------------------------------------------------------
# Strict JSON


class NonFiniteJSONError(ValueError):
    """A value to be written as JSON is NaN or infinite (JSON has no such numbers)."""


def _key_path(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _finite_only(obj: Any, non_finite: str, where: str, replaced: list[str]) -> Any:
    """Copy of ``obj`` with numbers as plain int/float and non-finite floats handled per ``non_finite``."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):  # float, numpy floats
        value = float(obj)
        if math.isfinite(value):
            return value
        if non_finite == "null":
            replaced.append(where or "<root>")
            return None
        raise NonFiniteJSONError(
            f"value at {where or '<root>'!r} is {value}: JSON has no NaN/Infinity "
            f"(fix the value, or write it as null with non_finite='null')"
        )
    if isinstance(obj, Mapping):
        return {key: _finite_only(value, non_finite, _key_path(where, key), replaced) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(value, non_finite, f"{where}[{i}]", replaced) for i, value in enumerate(obj)]
    item = getattr(obj, "item", None)  # 0-d numpy arrays and torch tensors, without importing either
    if callable(item) and getattr(obj, "shape", None) == ():
        return _finite_only(item(), non_finite, where, replaced)
    return obj  # left to json.dumps (which raises TypeError naming the type if it cannot write it)


def strict_json_dumps(obj: Any, non_finite: str = "error", indent: int | None = 2, **kwargs) -> str:
    """``json.dumps`` that only produces standard JSON (``allow_nan=False``).

    Non-finite numbers (NaN, +-inf, as Python floats, numpy scalars or 0-d tensors) raise
    :class:`NonFiniteJSONError` naming the key path (e.g. ``'Set5.psnr'``) with ``non_finite="error"``,
    or become ``null`` (with a logged warning naming the keys) with ``non_finite="null"``.
    """
    if non_finite not in ("error", "null"):
        raise ValueError(f"non_finite must be 'error' or 'null', got {non_finite!r}")
    replaced: list[str] = []
    clean = _finite_only(obj, non_finite, "", replaced)
    if replaced:
        log.warning("non-finite values written as null in JSON: %s", ", ".join(replaced))
    return json.dumps(clean, allow_nan=False, indent=indent, **kwargs)


def write_json_strict(path: str | os.PathLike, obj: Any, non_finite: str = "error", indent: int | None = 2) -> Path:
    """Write ``obj`` as standard JSON (see :func:`strict_json_dumps`) atomically, with a final newline.

    Nothing is written when a non-finite value raises.
    """
    text = strict_json_dumps(obj, non_finite=non_finite, indent=indent) + "\n"
    return atomic_write_text(path, text)


#: Alias with the naming of the other ``atomic_write_*`` helpers; always strict.
atomic_write_json = write_json_strict


# ----------------------------------------------------------------------------------------------------------
# Inter-process lock


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) while the block runs; blocks.

    ``fcntl.flock`` on POSIX (released by the kernel if the holder dies, so no stale locks); a no-op
    where ``fcntl`` is unavailable (Windows). On NFS, ``flock`` is emulated with byte-range locks by
    Linux clients (kernel >= 2.6.12).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

