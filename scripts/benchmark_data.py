"""Training-patch throughput: decoding PNGs per patch vs the memory-mapped decoded cache.

Measures patches per second in one process (= per DataLoader worker), 96x96 HR / 48x48 LR at x2
by default. Uses DIV2K HR images when --images points at them, otherwise a synthetic 2040x1356
PNG (DIV2K-sized) with its bicubic LR.

    python scripts/benchmark_data.py [--images DIR] [--scale 2] [--patch 48] [--seconds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dlsn.data.cache import ArrayCache
from dlsn.data.datasets import ImageRecord, SRTrainDataset
from dlsn.data.degradations import degrade
from dlsn.data.io import list_images, read_image, write_png


def synthetic_image(height: int = 1356, width: int = 2040, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus texture, so PNG compression behaves like a photo rather than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([127 + 100 * np.sin(xx / 97 + c) * np.cos(yy / 63 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def rate(fn, seconds: float) -> float:
    fn()  # warm-up (and cache build)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of HR images (e.g. DIV2K_train_HR); default: synthetic")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--patch", type=int, default=48, help="LR patch size")
    parser.add_argument("--count", type=int, default=2, help="number of images to use")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    s, p = args.scale, args.patch

    with tempfile.TemporaryDirectory(prefix="dlsn-bench-") as tmp:
        tmp = Path(tmp)
        if args.images:
            hr_files = list_images(args.images)[: args.count]
        else:
            hr_files = []
            for i in range(args.count):
                path = tmp / f"synthetic_{i}.png"
                write_png(path, synthetic_image(seed=i))
                hr_files.append(path)
        lr_files = []
        for hr in hr_files:  # an official-style LR PNG next to each HR image
            lr = tmp / f"{hr.stem}x{s}.png"
            write_png(lr, degrade(read_image(hr), s, "BI"))
            lr_files.append(lr)
        print(f"images: {[f.name for f in hr_files]} ({read_image(hr_files[0]).shape[1]}x{read_image(hr_files[0]).shape[0]}), "
              f"x{s}, LR patch {p}, HR patch {p * s}")

        rng = np.random.default_rng(0)

        def png_patch():
            i = int(rng.integers(len(hr_files)))
            hr, lr = read_image(hr_files[i]), read_image(lr_files[i])
            top, left = int(rng.integers(lr.shape[0] - p + 1)), int(rng.integers(lr.shape[1] - p + 1))
            return lr[top : top + p, left : left + p], hr[top * s : (top + p) * s, left * s : (left + p) * s]

        records = [ImageRecord(hr_file.stem, hr_file, lr_file) for hr_file, lr_file in zip(hr_files, lr_files)]
        dataset = SRTrainDataset(records, s, "BI", p, length=10**9, cache=ArrayCache(tmp / "cache"))
        state = {"i": 0}

        def cached_patch():
            state["i"] += 1
            return dataset[state["i"]]

        png_rate = rate(png_patch, args.seconds)
        cache_rate = rate(cached_patch, args.seconds)
        print(f"PNG decode per patch : {png_rate:10.1f} patches/s per worker")
        print(f"memory-mapped cache  : {cache_rate:10.1f} patches/s per worker (incl. flips and tensor conversion)")
        print(f"speed-up             : {cache_rate / png_rate:10.1f}x")


if __name__ == "__main__":
    main()
