"""DIV2K (Agustsson & Timofte, 2017): download, verify, extract, and list image records.

Layout after extraction (the archives' own folder names)::

    <root>/DIV2K_train_HR/0001.png ... 0800.png
    <root>/DIV2K_valid_HR/0801.png ... 0900.png
    <root>/DIV2K_{train,valid}_LR_bicubic/X{2,3,4}/0001x2.png ...

Checksums: the DIV2K site publishes no checksums, and we do not invent any. :data:`KNOWN_SHA256`
is empty until filled from a verified download; the downloader records the SHA-256 of every
archive it completes in ``<root>/checksums.json`` and verifies later (re)downloads against it.

Downloads are resumable: a partial ``<archive>.part`` is continued with an HTTP ``Range`` request
(a server that ignores ``Range`` restarts from zero). Offline, :class:`DownloadError` says what to
download by hand and where to put it (and whether partial data was kept).

Concurrency: two processes preparing the same ``root`` (two runs started at once, or two nodes on
shared storage) take turns per archive through a lock file ``<root>/.<archive>.lock``; the second
one then finds the folder extracted and skips it. ``checksums.json`` is updated under its own lock
and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from dlsn.data.datasets import ImageRecord, _pair_with_lr
from dlsn.data.io import list_images
from dlsn.utils.files import file_lock, write_json_strict

__all__ = ["DIV2K_URL", "KNOWN_SHA256", "DownloadError", "ChecksumError", "archive_names", "download_file",
           "sha256_of", "extract_zip", "prepare_div2k", "div2k_records", "TRAIN_IDS"]

log = logging.getLogger(__name__)

DIV2K_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"
TRAIN_IDS = (1, 800)
#: SHA-256 of the official archives, by file name. Empty: none are published; see module docstring.
KNOWN_SHA256: dict[str, str] = {}
CHECKSUM_FILE = "checksums.json"


class DownloadError(RuntimeError):
    """A download failed (offline, HTTP error, ...)."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its expected SHA-256."""


def archive_names(splits=("train", "valid"), scales=(2, 3, 4), hr: bool = True, lr: bool = True) -> list[str]:
    names = []
    for split in splits:
        if split not in ("train", "valid"):
            raise ValueError(f"DIV2K split must be 'train' or 'valid', got {split!r}")
        if hr:
            names.append(f"DIV2K_{split}_HR.zip")
        if lr:
            names += [f"DIV2K_{split}_LR_bicubic_X{s}.zip" for s in scales]
    return names


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 30.0,
                  chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify ``sha256`` if given.

    Raises :class:`DownloadError` (network) or :class:`ChecksumError` (mismatch; the bad file is
    deleted so the next attempt starts over).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:
                log.info("server ignored the Range request for %s; restarting download", url)
                offset = 0
            mode = "ab" if offset else "wb"
            with open(part, mode) as f:
                shutil.copyfileobj(response, f, chunk)
                f.flush()
                os.fsync(f.fileno())  # the rename below must not publish data still in the page cache
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the part file is already complete
            pass
        else:
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}." + _partial_note(part)) from exc
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
        raise DownloadError(
            f"cannot download {url} ({exc}). If this machine is offline, download the file elsewhere and "
            f"place it at {dest} (or extract DIV2K yourself and point data.div2k_dir at it)."
            + _partial_note(part)
        ) from exc
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise ChecksumError(f"checksum mismatch for {dest.name} from {url}: expected sha256 {sha256}, got {actual}; "
                                f"the file was deleted, run again to re-download")
    os.replace(part, dest)
    return dest


def _partial_note(part: Path) -> str:
    """The sentence about a kept partial download, only when there is one (an empty file is removed)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return ""
    if size == 0:
        part.unlink(missing_ok=True)
        return ""
    return f" Partial data ({size} bytes) kept in {part} is resumed next time."


def extract_zip(archive: str | Path, target_dir: str | Path) -> None:
    """Extract ``archive`` into ``target_dir``, refusing members that would escape it."""
    archive, target_dir = Path(archive), Path(target_dir)
    try:
        with zipfile.ZipFile(archive) as zf:
            root = target_dir.resolve()
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: unsafe member path {member!r}")
            zf.extractall(target_dir)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive} is not a valid zip archive ({exc}); delete it and download again") from exc


def _load_checksums(root: Path) -> dict[str, str]:
    path = root / CHECKSUM_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _record_checksum(root: Path, name: str, digest: str) -> None:
    # Read-modify-write under a lock, so that two processes recording different archives keep both.
    with file_lock(root / f".{CHECKSUM_FILE}.lock"):
        sums = _load_checksums(root)
        sums[name] = digest
        write_json_strict(root / CHECKSUM_FILE, dict(sorted(sums.items())))


def _extracted_folder(name: str) -> str:
    """Folder an archive extracts to: DIV2K_train_HR.zip -> DIV2K_train_HR,
    DIV2K_train_LR_bicubic_X2.zip -> DIV2K_train_LR_bicubic/X2."""
    stem = name.removesuffix(".zip")
    if "_LR_bicubic_X" in stem:
        base, scale = stem.rsplit("_X", 1)
        return f"{base}/X{scale}"
    return stem


def prepare_div2k(root: str | Path, splits=("train", "valid"), scales=(2, 3, 4), hr: bool = True, lr: bool = True,
                  base_url: str = DIV2K_URL, keep_archives: bool = False, timeout: float = 30.0) -> Path:
    """Make sure the requested DIV2K parts exist under ``root``, downloading what is missing.

    Already extracted folders are left alone (so existing copies can simply be pointed at).
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for name in archive_names(splits, scales, hr, lr):
        with file_lock(root / f".{name}.lock"):  # another process may be fetching the same archive
            _prepare_archive(root, name, base_url, keep_archives, timeout)
    return root


def _prepare_archive(root: Path, name: str, base_url: str, keep_archives: bool, timeout: float) -> None:
    """Download (if needed), verify and extract one archive, unless its folder is already there."""
    folder = root / _extracted_folder(name)
    if folder.is_dir() and any(folder.iterdir()):
        log.info("%s already present", folder)
        return
    archive = root / name
    expected = KNOWN_SHA256.get(name) or _load_checksums(root).get(name)
    if not archive.exists():
        log.info("downloading %s", base_url + name)
        download_file(base_url.rstrip("/") + "/" + name, archive, sha256=expected, timeout=timeout)
    elif expected is not None and sha256_of(archive) != expected:
        raise ChecksumError(f"{archive} does not match the recorded sha256 {expected}; delete it and run again")
    digest = expected or sha256_of(archive)
    if expected is None:
        _record_checksum(root, name, digest)
        log.info("recorded sha256 of %s in %s", name, root / CHECKSUM_FILE)
    extract_zip(archive, root)
    if not keep_archives:
        archive.unlink()


def div2k_records(root: str | Path, split: str, scale: int, ids: tuple[int, int] | None = None,
                  use_official_lr: bool = True, on_error: str = "raise",
                  skipped: list[str] | None = None) -> list[ImageRecord]:
    """Records of DIV2K ``split`` ('train' or 'valid'), restricted to image numbers ``ids`` (inclusive).

    The official bicubic LR (``DIV2K_{split}_LR_bicubic/X{s}``) is paired when that folder exists.
    """
    root = Path(root).expanduser()
    if split not in ("train", "valid"):
        raise ValueError(f"DIV2K split must be 'train' or 'valid', got {split!r}")
    hr_dir = root / f"DIV2K_{split}_HR"
    if not hr_dir.is_dir():
        raise FileNotFoundError(
            f"DIV2K HR folder not found: {hr_dir}. Run `python scripts/prepare_div2k.py --root {root}` "
            f"or set data.div2k_dir to a folder containing DIV2K_{split}_HR/"
        )
    files = list_images(hr_dir)
    if ids is not None:
        first, last = ids
        files = [f for f in files if f.stem.isdigit() and first <= int(f.stem) <= last]
        if not files:
            raise FileNotFoundError(f"no DIV2K images numbered {first:04d}-{last:04d} in {hr_dir}")
    lr_dir = root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
    return _pair_with_lr(files, lr_dir if use_official_lr and lr_dir.is_dir() else None, scale, on_error, skipped)
