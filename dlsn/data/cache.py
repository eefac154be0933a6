"""One-time decoded-image cache: one ``.npy`` per (source file, variant), memory-mapped on read.

Decoding a 2K PNG takes tens of milliseconds, far too slow to do per training patch. Each decoded
(or degraded) image is therefore written once as a raw ``.npy`` file and later opened with
``np.load(mmap_mode="r")``, so a patch costs a slice copy.

Keys: an entry is valid for one exact source file state. Its file name contains a hash of the
resolved source path, the variant (e.g. ``hr``, ``lr-BD-x4``), :data:`CACHE_VERSION` and the
source's *fingerprint*:

* size, modification time (ns), inode and status-change time (``st_ctime_ns``), read with one
  ``fstat`` of the opened file. ``mtime`` can be set back by anyone (``os.utime``, ``cp -p``,
  ``rsync -t``, ``tar``), so size + mtime alone let a replaced file of the same size look unchanged
  (the bug this key fixes). ``ctime`` cannot be set from user space: writing the file in place or
  setting its times updates it, and a file renamed into place is a new inode;
* a BLAKE2 hash of the first and last :data:`FINGERPRINT_BYTES` bytes, which also catches a change
  made within one tick of the filesystem's ctime clock (a few ms on Linux) for most image files
  (their headers and the two ends of the compressed stream change with the pixels).

When the fingerprint changes the entry is rebuilt (older entries of the same source and variant are
deleted). The cost of the stricter key: copying or restoring the image folder (new inodes/ctimes),
``chmod``/``chown`` of the images, or a filesystem whose inode numbers are not stable across mounts
makes the cache rebuild once; it never serves a stale image. Reading the fingerprint costs one open
and two small reads per image and variant when a dataset is built.

Writes go through :func:`dlsn.utils.files.atomic_write` (unique temporary file in the cache folder,
fsync, ``os.replace``), so concurrent workers/processes never observe a half-written file, and the
entries get the permissions the umask allows (shared caches stay readable by the group).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dlsn.utils.files import atomic_write

__all__ = ["CACHE_VERSION", "FINGERPRINT_BYTES", "ArrayCache", "ArrayHandle", "source_fingerprint"]

log = logging.getLogger(__name__)

#: Bump when the content of cached arrays would change (e.g. a fix in the degradation code).
CACHE_VERSION = 1
#: Bytes hashed at each end of a source file (see the module docstring).
FINGERPRINT_BYTES = 8192


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def source_fingerprint(source: str | Path) -> tuple[str, int, int, int, int, str]:
    """``(resolved path, size, mtime_ns, inode, ctime_ns, hash of both ends)`` of a file (module docstring).

    The stat and the bytes come from the same open file, so a file replaced meanwhile cannot mix states.
    """
    source = Path(source)
    try:
        handle = open(source, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"cache source file not found: {source}") from None
    with handle:
        st = os.fstat(handle.fileno())
        ends = hashlib.blake2b(digest_size=8)
        ends.update(handle.read(FINGERPRINT_BYTES))
        if st.st_size > FINGERPRINT_BYTES:
            handle.seek(max(st.st_size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
            ends.update(handle.read(FINGERPRINT_BYTES))
    return str(source.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, ends.hexdigest()


class ArrayHandle:
    """A picklable reference to an array: a cached ``.npy`` path (memory-mapped lazily, once per
    process) or an in-memory array. DataLoader workers receive paths, not pixel data."""

    def __init__(self, path: Path | None = None, array: np.ndarray | None = None) -> None:
        if (path is None) == (array is None):
            raise ValueError("ArrayHandle needs exactly one of path or array")
        self.path = path
        self._array = array

    def get(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.get().shape

    def __getstate__(self):
        # Memory maps are reopened in the receiving process instead of being pickled as a copy.
        return {"path": self.path, "_array": None if self.path is not None else self._array}


class ArrayCache:
    """Disk cache of decoded arrays under ``root`` (or an in-memory dict when ``root`` is None)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser()
        self._memory: dict[tuple, np.ndarray] = {}

    def entry_path(self, source: str | Path, variant: str) -> Path:
        """Cache file for the current state of ``source`` and ``variant`` (may not exist yet)."""
        if self.root is None:
            raise RuntimeError("ArrayCache without a root folder has no entry paths")
        source = Path(source)
        fingerprint = source_fingerprint(source)
        path_hash = hashlib.sha1(fingerprint[0].encode()).hexdigest()[:10]
        state = "|".join(map(str, fingerprint))
        state_hash = hashlib.sha1(f"{state}|{variant}|v{CACHE_VERSION}".encode()).hexdigest()[:12]
        return self.root / f"{_safe(source.stem)}.{path_hash}.{_safe(variant)}.{state_hash}.npy"

    def handle(self, source: str | Path, variant: str, producer: Callable[[], np.ndarray]) -> ArrayHandle:
        """Return a handle to the cached array, computing it with ``producer()`` when absent or stale."""
        source = Path(source)
        if self.root is None:
            key = (*source_fingerprint(source), variant)
            if key not in self._memory:
                self._memory[key] = np.ascontiguousarray(producer())
            return ArrayHandle(array=self._memory[key])
        entry = self.entry_path(source, variant)
        if not entry.exists():
            self._write(entry, producer())
        return ArrayHandle(path=entry)

    def get(self, source: str | Path, variant: str, producer: Callable[[], np.ndarray]) -> np.ndarray:
        """Like :meth:`handle` but returns the (memory-mapped) array."""
        return self.handle(source, variant, producer).get()

    def _write(self, entry: Path, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        atomic_write(entry, lambda handle: np.save(handle, array))
        # Drop stale entries of the same source and variant (same name prefix, other state hash).
        prefix = entry.name.rsplit(".", 2)[0] + "."
        for old in entry.parent.glob(prefix + "*.npy"):
            if old != entry:
                try:
                    old.unlink()
                    log.debug("removed stale cache entry %s", old)
                except OSError:
                    pass
