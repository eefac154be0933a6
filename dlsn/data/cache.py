"""One-time decoded-image cache: one ``.npy`` per (source file, variant), memory-mapped on read.

Decoding a 2K PNG takes tens of milliseconds, far too slow to do per training patch. Each decoded
(or degraded) image is therefore written once as a raw ``.npy`` file and later opened with
``np.load(mmap_mode="r")``, so a patch costs a slice copy.

Keys: an entry is valid for one exact source file state. Its file name contains a hash of the
resolved source path, its size and its modification time (ns), the variant (e.g. ``hr``,
``lr-BD-x4``) and :data:`CACHE_VERSION`; if the source changes the key changes and the entry is
rebuilt (older entries of the same source and variant are deleted). Writes go to a temporary file
in the cache folder followed by ``os.replace``, so concurrent workers/processes never observe a
half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["CACHE_VERSION", "ArrayCache", "ArrayHandle"]

log = logging.getLogger(__name__)

#: Bump when the content of cached arrays would change (e.g. a fix in the degradation code).
CACHE_VERSION = 1


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


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

    @staticmethod
    def _source_state(source: Path) -> tuple[str, int, int]:
        try:
            st = source.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"cache source file not found: {source}") from None
        return str(source.resolve()), st.st_size, st.st_mtime_ns

    def entry_path(self, source: str | Path, variant: str) -> Path:
        """Cache file for the current state of ``source`` and ``variant`` (may not exist yet)."""
        if self.root is None:
            raise RuntimeError("ArrayCache without a root folder has no entry paths")
        source = Path(source)
        resolved, size, mtime = self._source_state(source)
        path_hash = hashlib.sha1(resolved.encode()).hexdigest()[:10]
        state_hash = hashlib.sha1(f"{resolved}|{size}|{mtime}|{variant}|v{CACHE_VERSION}".encode()).hexdigest()[:12]
        return self.root / f"{_safe(source.stem)}.{path_hash}.{_safe(variant)}.{state_hash}.npy"

    def handle(self, source: str | Path, variant: str, producer: Callable[[], np.ndarray]) -> ArrayHandle:
        """Return a handle to the cached array, computing it with ``producer()`` when absent or stale."""
        source = Path(source)
        if self.root is None:
            key = (*self._source_state(source), variant)
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
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(array))
            os.replace(tmp, entry)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        # Drop stale entries of the same source and variant (same name prefix, other state hash).
        prefix = entry.name.rsplit(".", 2)[0] + "."
        for old in entry.parent.glob(prefix + "*.npy"):
            if old != entry:
                try:
                    old.unlink()
                    log.debug("removed stale cache entry %s", old)
                except OSError:
                    pass
