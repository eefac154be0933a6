"""Image reading and normalisation to uint8 RGB.

Every image entering the data pipeline becomes an ``HxWx3`` uint8 array:

* grayscale (``L``, ``I;16``, ``1``, ...) is replicated to 3 channels;
* alpha is dropped (``RGBA``/``LA``), palettes are expanded;
* 16-bit images are scaled to 8 bits with ``round(v * 255 / 65535)``.

Unreadable or corrupt files raise :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "read_image", "is_grayscale_file", "to_rgb_uint8", "list_images", "write_png"]

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
    """Write a uint8 image atomically (temporary file + ``os.replace``)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
