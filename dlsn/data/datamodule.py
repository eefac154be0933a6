"""LightningDataModule for SR: random training patches, full-image validation/test sets.

Set specifications (``train_set``, ``val_sets``, ``test_sets``) are resolved in this order:

* ``"sample"``: the bundled scikit-image sample set (train split / val split), see
  :mod:`dlsn.data.sample`;
* ``"DIV2K"``: DIV2K under ``div2k_dir`` (train 0001-0800; validation ``div2k_val_ids``,
  0801-0810 by default), downloaded first when ``div2k_download`` is true;
* a set name under ``benchmark_dir`` (``<benchmark_dir>/<name>/HR/*.png``), e.g. ``Set5``;
* a path to a folder of images (or to a folder with ``HR/`` and optional ``LR_bicubic/X{s}/``).

Empty ``test_sets`` means "test on the validation sets".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dlsn.data.cache import ArrayCache
from dlsn.data.samplers import TrainPatchSampler, distributed_world_size, eval_sampler
from dlsn.data.datasets import ON_ERROR, SREvalDataset, SRTrainDataset, benchmark_records, folder_records
from dlsn.data.degradations import check_degradation, check_scale
from dlsn.data.div2k import TRAIN_IDS, div2k_records, prepare_div2k
from dlsn.data.sample import prepare_sample, sample_folder

__all__ = ["SRDataModule"]

log = logging.getLogger(__name__)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class SRDataModule(L.LightningDataModule):
    """Super-resolution data: ``{"lr", "hr", "name"}`` batches with values in ``[0, rgb_range]``.

    Args:
        scale: SR factor (2, 3, 4, ...).
        degradation: ``BI``, ``BD`` or ``DN`` (see :mod:`dlsn.data.degradations`).
        patch_size: LR training patch side (HR patch is ``patch_size * scale``).
        batch_size: training batch size (validation/test always use 1 full image per batch).
        iters_per_epoch: training batches per epoch; the training set has
            ``iters_per_epoch * batch_size`` random patches whatever the number of images.
        num_workers: DataLoader worker processes (0 = load in the main process).
        rgb_range: pixel values are ``uint8 / 255 * rgb_range``.
        cache_dir: folder of the decoded-image cache (and of the sample PNGs); None = in memory.
        train_set / val_sets / test_sets: set specifications (see module docstring).
        benchmark_dir: root of benchmark sets (``<dir>/<Set>/HR``).
        div2k_dir, div2k_download, div2k_val_ids: DIV2K location, auto-download, validation range.
        sample_dir: where the sample PNGs go (default ``<cache_dir>/sample``).
        augment: random flips/transposition of training patches.
        eval_seed: base seed of the fixed per-image DN noise of validation/test sets.
        on_error: ``raise`` (default) or ``skip`` (log and skip) unreadable/too small/unpaired images.
        use_official_lr: use official bicubic LR files (DIV2K, ``LR_bicubic``) when present.
        persistent_workers, pin_memory: DataLoader options (pin_memory None = when CUDA is available).
    """

    def __init__(
        self,
        scale: int = 4,
        degradation: str = "BI",
        patch_size: int = 48,
        batch_size: int = 16,
        iters_per_epoch: int = 1000,
        num_workers: int = 0,
        rgb_range: float = 1.0,
        cache_dir: str | os.PathLike | None = ".cache/dlsn",
        train_set: str | None = "sample",
        val_sets: Sequence[str] | str | None = ("sample",),
        test_sets: Sequence[str] | str | None = (),
        benchmark_dir: str | os.PathLike | None = None,
        div2k_dir: str | os.PathLike | None = None,
        div2k_download: bool = False,
        div2k_val_ids: Sequence[int] = (801, 810),
        sample_dir: str | os.PathLike | None = None,
        augment: bool = True,
        eval_seed: int = 0,
        on_error: str = "raise",
        use_official_lr: bool = True,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        self.degradation = check_degradation(degradation)
        for key, value in (("patch_size", patch_size), ("batch_size", batch_size), ("iters_per_epoch", iters_per_epoch)):
            if int(value) < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if not float(rgb_range) > 0:
            raise ValueError(f"rgb_range must be > 0, got {rgb_range!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
        self.patch_size, self.batch_size = int(patch_size), int(batch_size)
        self.iters_per_epoch, self.num_workers, self.rgb_range = int(iters_per_epoch), int(num_workers), float(rgb_range)
        self.cache_dir = None if cache_dir in (None, "") else Path(cache_dir).expanduser()
        self.train_set = train_set
        self.val_sets_spec = _as_list(val_sets)
        self.test_sets_spec = _as_list(test_sets)
        self.benchmark_dir = None if benchmark_dir in (None, "") else Path(benchmark_dir).expanduser()
        self.div2k_dir = None if div2k_dir in (None, "") else Path(div2k_dir).expanduser()
        self.div2k_download = bool(div2k_download)
        if len(div2k_val_ids) != 2:
            raise ValueError(f"div2k_val_ids must be [first, last], got {div2k_val_ids!r}")
        self.div2k_val_ids = (int(div2k_val_ids[0]), int(div2k_val_ids[1]))
        if sample_dir not in (None, ""):
            self.sample_dir = Path(sample_dir).expanduser()
        else:
            self.sample_dir = (self.cache_dir if self.cache_dir is not None else Path(".cache/dlsn")) / "sample"
        self.augment, self.eval_seed, self.on_error = bool(augment), int(eval_seed), on_error
        self.use_official_lr = bool(use_official_lr)
        self.persistent_workers = bool(persistent_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        # Not logged: train.py logs the whole config once (the data section included).
        self.save_hyperparameters(logger=False)

        self._cache = ArrayCache(None if self.cache_dir is None else self.cache_dir / "arrays")
        self.train_dataset: Dataset | None = None
        self.val_datasets: list[SREvalDataset] = []
        self.test_datasets: list[SREvalDataset] = []

    # ------------------------------------------------------------------ set resolution
    def _all_specs(self) -> list[str]:
        return ([self.train_set] if self.train_set else []) + self.val_sets_spec + self.test_sets_spec

    def _div2k_root(self) -> Path:
        if self.div2k_dir is None:
            raise ValueError("set 'DIV2K' requested but data.div2k_dir is not set")
        return self.div2k_dir

    def _resolve(self, spec: str, train: bool):
        """(display name, records) of one set specification."""
        key = spec.lower()
        if key == "sample":
            return "sample", folder_records(sample_folder(self.sample_dir, "train" if train else "val"), self.scale, self.on_error)
        if key == "div2k":
            split, ids = ("train", TRAIN_IDS) if train else ("valid", self.div2k_val_ids)
            return "DIV2K", div2k_records(self._div2k_root(), split, self.scale, ids, self.use_official_lr, self.on_error)
        if self.benchmark_dir is not None and (self.benchmark_dir / spec).is_dir():
            return spec, benchmark_records(self.benchmark_dir, spec, self.scale, self.on_error)
        path = Path(spec).expanduser()
        if path.is_dir():
            return path.name, folder_records(path, self.scale, self.on_error)
        where = f"under benchmark_dir={self.benchmark_dir}" if self.benchmark_dir else "(data.benchmark_dir is not set)"
        raise FileNotFoundError(f"data set {spec!r} not found: it is not 'sample', 'DIV2K', a set folder {where}, "
                                f"or an existing folder of images")

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download/write data once per node: the sample PNGs and, if enabled, DIV2K."""
        specs = [s.lower() for s in self._all_specs()]
        if "sample" in specs:
            prepare_sample(self.sample_dir)
        if "div2k" in specs and self.div2k_download:
            splits = (["train"] if (self.train_set or "").lower() == "div2k" else []) + ["valid"]
            prepare_div2k(self._div2k_root(), splits=splits, scales=(self.scale,),
                          lr=self.use_official_lr and self.degradation in ("BI", "DN"))

    def _eval_datasets(self, specs: list[str]) -> list[SREvalDataset]:
        datasets = []
        for spec in specs:
            name, records = self._resolve(spec, train=False)
            datasets.append(SREvalDataset(records, self.scale, self.degradation, name, self._cache, self.rgb_range,
                                          self.eval_seed, self.on_error))
        return datasets

    def setup(self, stage: str | None = None) -> None:
        if "sample" in [s.lower() for s in self._all_specs()]:
            prepare_sample(self.sample_dir)  # idempotent; covers use without prepare_data()
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.train_set:
                raise ValueError("training needs data.train_set (e.g. 'sample', 'DIV2K' or a folder)")
            _, records = self._resolve(self.train_set, train=True)
            self.train_dataset = SRTrainDataset(records, self.scale, self.degradation, self.patch_size,
                                                self.iters_per_epoch * self.batch_size * distributed_world_size(),
                                                self._cache, self.rgb_range,
                                                self.augment, self.on_error)
        if stage in (None, "fit", "validate") and not self.val_datasets:
            self.val_datasets = self._eval_datasets(self.val_sets_spec)
        if stage in (None, "test") and not self.test_datasets:
            self.test_datasets = self._eval_datasets(self.test_sets_spec or self.val_sets_spec)

    # ------------------------------------------------------------------ loaders
    @property
    def val_set_names(self) -> list[str]:
        return [d.set_name for d in self.val_datasets]

    @property
    def test_set_names(self) -> list[str]:
        return [d.set_name for d in self.test_datasets]

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        # Patches are drawn at random inside the dataset from (seed, epoch, index) keys: no shuffling,
        # and a resumed run sees the same patches as an uninterrupted one.
        return DataLoader(self.train_dataset, batch_size=self.batch_size, drop_last=True,
                          sampler=TrainPatchSampler(self.train_dataset), **self._loader_kwargs())

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """One evaluation DataLoader: full images, batch size 1, sequential order."""
        kwargs = self._loader_kwargs()
        kwargs["num_workers"] = min(kwargs["num_workers"], len(dataset))
        kwargs["persistent_workers"] = kwargs["persistent_workers"] and kwargs["num_workers"] > 0
        return DataLoader(dataset, batch_size=1, shuffle=False, sampler=eval_sampler(dataset), **kwargs)

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_datasets:
            self.setup("validate")
        return [self._eval_loader(d) for d in self.val_datasets]

    def test_dataloader(self) -> list[DataLoader]:
        if not self.test_datasets:
            self.setup("test")
        return [self._eval_loader(d) for d in self.test_datasets]
