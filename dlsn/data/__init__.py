"""Data pipeline: MATLAB-compatible resize, degradations, datasets, cache and the DataModule.

Public API::

    imresize(img, scale)                       # MATLAB imresize (numpy HxW[xC] or tensors)
    degrade(hr, scale, kind, seed=None)        # BI / BD / DN LR image (uint8)
    read_image(path)                           # any image file -> HxWx3 uint8
    SRDataModule(...)                          # LightningDataModule (see configs/data/*.yaml)
    SRTrainDataset, SREvalDataset, ArrayCache, prepare_div2k, prepare_sample, ...

See docs/data.md.
"""

from dlsn.data.cache import ArrayCache, ArrayHandle
from dlsn.data.datamodule import SRDataModule
from dlsn.data.datasets import ImageRecord, SREvalDataset, SRTrainDataset, benchmark_records, folder_records
from dlsn.data.degradations import DEGRADATIONS, degrade, modcrop
from dlsn.data.div2k import ChecksumError, DownloadError, div2k_records, prepare_div2k
from dlsn.data.io import ImageReadError, read_image
from dlsn.data.sample import prepare_sample
from dlsn.imresize import imresize, imresize_torch

__all__ = [
    "imresize", "imresize_torch", "degrade", "modcrop", "DEGRADATIONS", "read_image", "ImageReadError",
    "ArrayCache", "ArrayHandle", "ImageRecord", "SRTrainDataset", "SREvalDataset", "benchmark_records",
    "folder_records", "div2k_records", "prepare_div2k", "DownloadError", "ChecksumError", "prepare_sample",
    "SRDataModule",
]
