"""Bundled sample set: colour images shipped inside scikit-image (no download, no pooch).

The default data of the quickstart run and of the tests. The images are written once as PNG files
under ``<root>/train`` and ``<root>/val`` and then behave like any image folder.

* train: astronaut (512x512), chelsea (300x451), rocket (427x640), hubble_deep_field (872x1000),
  retina (1411x1411), motorcycle left/right views (500x741 each);
* val: coffee and immunohistochemistry, each centre-cropped to at most 256x256 HR so that CPU
  validation takes a moment (documented in docs/data.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlsn.data.io import to_rgb_uint8, write_png

__all__ = ["SAMPLE_TRAIN", "SAMPLE_VAL", "VAL_CROP", "sample_image", "prepare_sample", "sample_folder"]

SAMPLE_TRAIN = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "retina", "motorcycle_left", "motorcycle_right")
SAMPLE_VAL = ("coffee", "immunohistochemistry")
#: Validation images are centre-cropped to at most this many HR pixels per side.
VAL_CROP = 256


def sample_image(name: str) -> np.ndarray:
    """Load one bundled scikit-image picture as HxWx3 uint8 (offline)."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        return to_rgb_uint8(left if name == "motorcycle_left" else right, name)
    if name not in SAMPLE_TRAIN + SAMPLE_VAL:
        raise ValueError(f"unknown sample image {name!r}; available: {list(SAMPLE_TRAIN + SAMPLE_VAL)}")
    return to_rgb_uint8(getattr(skimage.data, name)(), name)


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = min(h, size), min(w, size)
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top : top + ch, left : left + cw]


def sample_folder(root: str | Path, split: str) -> Path:
    if split not in ("train", "val"):
        raise ValueError(f"sample split must be 'train' or 'val', got {split!r}")
    return Path(root).expanduser() / split


def prepare_sample(root: str | Path) -> dict[str, Path]:
    """Write the sample PNGs under ``root`` (once; existing files are kept). Returns split folders."""
    folders = {}
    for split, names in (("train", SAMPLE_TRAIN), ("val", SAMPLE_VAL)):
        folder = sample_folder(root, split)
        for name in names:
            target = folder / f"{name}.png"
            if not target.exists():
                img = sample_image(name)
                write_png(target, centre_crop(img, VAL_CROP) if split == "val" else img)
        folders[split] = folder
    return folders
