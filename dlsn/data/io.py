"""Image reading and normalisation to uint8 RGB.

Every image entering the data pipeline becomes an ``HxWx3`` uint8 array:

* grayscale (``L``, ``I;16``, ``1``, ...) is replicated to 3 channels;
* alpha is dropped (``RGBA``/``LA``), palettes are expanded;
* 16-bit images are scaled to 8 bits with ``round(v * 255 / 65535)``.

Unreadable or corrupt files raise :class:`ImageReadError` naming the file.

Image names: a record, a metric row and a saved SR image are named after the file's stem (``img_001``).
When two files of one folder share a stem (``a.png`` and ``a.jpg``), both keep their extension in the
name (``a_png``, ``a_jpg``), so their results and saved images stay apart (see :func:`unique_image_names`).
Saved SR images are called ``<name>_x<scale>_SR.png`` (:func:`sr_file_name`); :func:`strip_sr_suffix`
undoes that, so such a folder can be scored against the HR folder (``python -m dlsn.metrics``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dlsn.utils.files import atomic_write

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "read_image", "image_size", "is_grayscale_file", "to_rgb_uint8",
           "list_images", "write_png", "unique_image_names", "sr_file_name", "strip_sr_suffix"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(OSError):
    """An image file could not be decoded (missing, corrupt, or an unsupported format)."""


def to_rgb_uint8(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Normalise an array (HxW, HxWx1/2/3/4; uint8, uint16, bool or float in [0, 1]) to HxWx3 uint8."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.dtype != np.uint8 and a.max(initial=0) > 255):
        # 16-bit data (PIL reports 16-bit grayscale PNGs as int32 'I' mode).
        a = np.floor(np.clip(a.astype(np.float64), 0, 65535) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = np.floor(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"{source}: expected a 2-D image with 1-4 channels, got shape {array.shape}")
    if a.shape[2] in (2, 4):  # gray+alpha or RGBA: drop alpha
        a = a[:, :, :-1]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGB", "L"):
        return np.asarray(img)
    if mode in ("RGBA", "LA"):
        return np.asarray(img)  # alpha dropped by to_rgb_uint8
    if mode.startswith("I;16") or mode == "I":
        return np.asarray(img).astype(np.int64)
    if mode == "1":
        return np.asarray(img)
    if mode == "F":
        raise ImageReadError("floating-point images are not supported (mode 'F')")
    # P, PA, CMYK, YCbCr, LAB, ...: let PIL convert to RGB (palette transparency discarded).
    return np.asarray(img.convert("RGB"))


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an ``HxWx3`` uint8 RGB array (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            array = _pil_to_array(img)
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot decode image {path}: {exc}") from exc
    return to_rgb_uint8(array, str(path))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header only (no pixel decoding)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read the header of image {path}: {exc}") from exc
    return height, width


def is_grayscale_file(path: str | Path) -> bool:
    """True when the file stores a single colour channel (optionally with alpha), e.g. PNG mode 'L'.

    Used to evaluate such images on their gray level, as the published SR protocol does.
    """
    try:
        with Image.open(path) as img:
            return img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"cannot decode image {path}: {exc}") from exc


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name. Raises if the folder is missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
    return files


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 image as PNG atomically (:func:`dlsn.utils.files.atomic_write`)."""
    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def unique_image_names(paths: Sequence[str | Path]) -> list[str]:
    """One distinct name per file of a set: the stem, or ``<stem>_<ext>`` for stems that occur twice.

    ``[a.png, a.jpg, b.png] -> [a_png, a_jpg, b]``: records, metric rows and saved SR images
    (``a_png_x4_SR.png``) of the two files stay apart. A name that still collides (a file literally
    called ``a_png.bmp`` beside those two) gets ``_2``, ``_3``, ... in file order.
    """
    paths = [Path(p) for p in paths]
    stem_counts = Counter(p.stem for p in paths)
    names = [p.stem if stem_counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths]
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, number = name, 1
        while candidate in used:
            number += 1
            candidate = f"{name}_{number}"
        used.add(candidate)
        unique.append(candidate)
    return unique


def sr_file_name(name: str, scale: int) -> str:
    """File name of a saved SR image: ``<name>_x<scale>_SR.png`` (the name is used as it is)."""
    return f"{name}_x{int(scale)}_SR.png"


def strip_sr_suffix(stem: str, scale: int) -> str:
    """Image name from an SR file stem: drops a trailing ``_x<scale>_SR`` or ``_x<scale>`` (any case)."""
    return re.sub(rf"_x{int(scale)}(?:_SR)?$", "", stem, flags=re.IGNORECASE)
