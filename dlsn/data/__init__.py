"""Data pipeline: MATLAB-compatible resize, degradations, datasets, cache and the DataModule.

Public API::

    imresize(img, scale)                       # MATLAB imresize (numpy HxW[xC] or tensors)
    degrade(hr, scale, kind, seed=None)        # BI / BD / DN LR image (uint8)
    read_image(path)                           # any image file -> HxWx3 uint8
    SRDataModule(...)                          # LightningDataModule (see configs/data/*.yaml)
    SRTrainDataset, SREvalDataset, ArrayCache, prepare_div2k, prepare_sample, ...

See docs/data.md.

The names are imported on first use (PEP 562), so ``import dlsn.data.io`` (image reading, used by
tools such as ``python -m dlsn.metrics``) does not pull in Lightning with the DataModule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> submodule that defines it
_EXPORTS = {
    "ArrayCache": "dlsn.data.cache",
    "ArrayHandle": "dlsn.data.cache",
    "SRDataModule": "dlsn.data.datamodule",
    "ImageRecord": "dlsn.data.datasets",
    "SREvalDataset": "dlsn.data.datasets",
    "SRTrainDataset": "dlsn.data.datasets",
    "benchmark_records": "dlsn.data.datasets",
    "folder_records": "dlsn.data.datasets",
    "DEGRADATIONS": "dlsn.data.degradations",
    "degrade": "dlsn.data.degradations",
    "modcrop": "dlsn.data.degradations",
    "ChecksumError": "dlsn.data.div2k",
    "DownloadError": "dlsn.data.div2k",
    "div2k_records": "dlsn.data.div2k",
    "prepare_div2k": "dlsn.data.div2k",
    "ImageReadError": "dlsn.data.io",
    "read_image": "dlsn.data.io",
    "prepare_sample": "dlsn.data.sample",
    "imresize": "dlsn.imresize",
    "imresize_torch": "dlsn.imresize",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dlsn.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from dlsn.data.cache import ArrayCache, ArrayHandle
    from dlsn.data.datamodule import SRDataModule
    from dlsn.data.datasets import ImageRecord, SREvalDataset, SRTrainDataset, benchmark_records, folder_records
    from dlsn.data.degradations import DEGRADATIONS, degrade, modcrop
    from dlsn.data.div2k import ChecksumError, DownloadError, div2k_records, prepare_div2k
    from dlsn.data.io import ImageReadError, read_image
    from dlsn.data.sample import prepare_sample
    from dlsn.imresize import imresize, imresize_torch
