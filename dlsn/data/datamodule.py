"""LightningDataModule for SR: random training patches, full-image validation/test sets.

Set specifications (``train_set``, ``val_sets``, ``test_sets``) are resolved in this order:

* ``"sample"``: the bundled scikit-image sample set (train split / val split), see
  :mod:`dlsn.data.sample`;
* ``"DIV2K"``: DIV2K under ``div2k_dir`` (train 0001-0800; validation ``div2k_val_ids``,
  0801-0810 by default), downloaded first when ``div2k_download`` is true;
* a set name under ``benchmark_dir`` (``<benchmark_dir>/<name>/HR/*.png``), e.g. ``Set5``;
* a path to a folder of images (or to a folder with ``HR/`` and optional ``LR_bicubic/X{s}/``).

Empty ``test_sets`` means "test on the validation sets".

Evaluation sets are named ``sample``, ``DIV2K``, or after their folder; a folder called ``HR`` takes
the name of the folder above it (``.../Urban100/HR`` -> ``Urban100``). Metrics are logged per set name
(``val/<name>/psnr``), so two validation (or two test) sets with the same name are an error.

Before any training or evaluation, :meth:`SRDataModule.check_eval_sets` reads the *headers* of every
evaluation image (no decoding) and rejects, naming the file, images too small for the metrics: after
modcrop to a multiple of ``scale`` and the ``scale``-pixel border crop the Y image must be at least
11x11 (the SSIM window; :func:`dlsn.metrics.min_hr_size`), and the LR image at least 1x1. Official
LR files must have the matching size. With ``on_error=skip`` such images (and unreadable ones) are
left out instead, logged with a warning, and listed in ``skipped_eval_images``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dlsn.data.cache import ArrayCache
from dlsn.data.datasets import ON_ERROR, ImageRecord, SREvalDataset, SRTrainDataset, folder_records
from dlsn.data.degradations import check_degradation, check_scale
from dlsn.data.div2k import TRAIN_IDS, div2k_records, prepare_div2k
from dlsn.data.io import ImageReadError, image_size
from dlsn.data.sample import prepare_sample, sample_folder
from dlsn.data.samplers import ResumableTrainLoader, TrainPatchSampler, distributed_world_size, eval_sampler
from dlsn.metrics import SSIM_WINDOW, min_hr_size

__all__ = ["SRDataModule"]

log = logging.getLogger(__name__)


def set_name_of_folder(folder: str | os.PathLike) -> str:
    """Display name of an image-folder set: the folder's name, or its parent's when it is called ``HR``."""
    path = Path(os.path.abspath(Path(folder).expanduser()))  # absolute without resolving symlinks
    return path.parent.name if path.name.upper() == "HR" and path.parent.name else path.name


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
        on_error: ``raise`` (default) or ``skip`` (log and skip) unreadable/too small/unpaired images, for
            training and evaluation sets alike; skipped evaluation images are listed in ``skipped_eval_images``.
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
        #: Evaluation images left out under ``on_error=skip``: ``{set name: [file, ...]}`` (sets with skips only).
        self.skipped_eval_images: dict[str, list[str]] = {}
        # Result of check_eval_sets per stage ("val"/"test"): [(set name, records that passed)].
        self._checked_sets: dict[str, list[tuple[str, list[ImageRecord]]]] = {}

    # ------------------------------------------------------------------ set resolution
    def _all_specs(self) -> list[str]:
        return ([self.train_set] if self.train_set else []) + self.val_sets_spec + self.test_sets_spec

    def _div2k_root(self) -> Path:
        if self.div2k_dir is None:
            raise ValueError("set 'DIV2K' requested but data.div2k_dir is not set")
        return self.div2k_dir

    def _resolve(self, spec: str, train: bool, skipped: list[str] | None = None) -> tuple[str, list[ImageRecord], str]:
        """(display name, records, location for messages) of one set specification.

        ``skipped`` collects the HR files left out under ``on_error=skip`` (e.g. without their LR file).
        """
        key = spec.lower()
        if key == "sample":
            folder = sample_folder(self.sample_dir, "train" if train else "val")
            return "sample", folder_records(folder, self.scale, self.on_error, skipped), str(folder)
        if key == "div2k":
            split, ids = ("train", TRAIN_IDS) if train else ("valid", self.div2k_val_ids)
            records = div2k_records(self._div2k_root(), split, self.scale, ids, self.use_official_lr, self.on_error, skipped)
            return "DIV2K", records, f"{self._div2k_root()} ({split} {ids[0]:04d}-{ids[1]:04d})"
        if self.benchmark_dir is not None and (self.benchmark_dir / spec).is_dir():
            folder = self.benchmark_dir / spec
            return set_name_of_folder(folder), folder_records(folder, self.scale, self.on_error, skipped), str(folder)
        path = Path(spec).expanduser()
        if path.is_dir():
            return set_name_of_folder(path), folder_records(path, self.scale, self.on_error, skipped), str(path)
        where = f"under benchmark_dir={self.benchmark_dir}" if self.benchmark_dir else "(data.benchmark_dir is not set)"
        raise FileNotFoundError(f"data set {spec!r} not found: it is not 'sample', 'DIV2K', a set folder {where}, "
                                f"or an existing folder of images")

    # ------------------------------------------------------------------ evaluation-set checks
    def _eval_specs(self, stage: str) -> list[str]:
        return self.val_sets_spec if stage == "val" else (self.test_sets_spec or self.val_sets_spec)

    def _eval_image_problem(self, record: ImageRecord) -> Exception | None:
        """Why ``record`` cannot be evaluated (from image headers only), or None when it can.

        :class:`ImageReadError` for an unreadable file, ``ValueError`` for a wrong size.
        """
        s = self.scale
        try:
            height, width = image_size(record.hr_path)
        except ImageReadError as exc:
            return exc
        crop_h, crop_w = height - height % s, width - width % s
        if crop_h < s or crop_w < s:
            return ValueError(f"evaluation image {record.hr_path} is {height}x{width} pixels, smaller than the scale "
                              f"{s}: its LR image would be empty")
        y_h, y_w = crop_h - 2 * s, crop_w - 2 * s
        if min(y_h, y_w) < SSIM_WINDOW:
            side = min_hr_size(s)
            return ValueError(
                f"evaluation image {record.hr_path} is {height}x{width} pixels: after modcrop to a multiple of {s} "
                f"({crop_h}x{crop_w}) and the {s}-pixel border crop of the metrics, {max(y_h, 0)}x{max(y_w, 0)} are "
                f"left, but SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW}; x{s} evaluation images must be at least "
                f"{side}x{side} pixels"
            )
        if record.lr_path is not None and self.degradation in ("BI", "DN"):
            try:
                lr_h, lr_w = image_size(record.lr_path)
            except ImageReadError as exc:
                return exc
            if (lr_h, lr_w) != (crop_h // s, crop_w // s):
                return ValueError(f"LR file {record.lr_path} has size {lr_h}x{lr_w}, expected {crop_h // s}x{crop_w // s} "
                                  f"(HR {record.hr_path} is {height}x{width}, {crop_h}x{crop_w} after modcrop, scale {s})")
        return None

    def _note_skipped(self, set_name: str, files: list[str], reasons: dict[str, str] | None = None) -> None:
        """Add ``files`` to :attr:`skipped_eval_images` and log one warning with their count and reasons."""
        if not files:
            return
        listed = self.skipped_eval_images.setdefault(set_name, [])
        new = [f for f in files if f not in listed]
        listed.extend(new)
        if new:
            detail = "; ".join((reasons or {}).get(f, f) for f in new)
            log.warning("evaluation set %r: skipped %d image(s) (data.on_error=skip): %s", set_name, len(new), detail)

    def check_eval_sets(self, stage: Literal["val", "test", "all"] = "all") -> dict[str, list[str]]:
        """Check the validation (``"val"``) and/or test (``"test"``) sets before any work is done on them.

        Reads only image headers (see the module docstring for the rules). Raises, naming the file and
        the size needed, for an image that is too small or unreadable (``on_error=raise``), or skips it
        (``on_error=skip``: logged, listed in :attr:`skipped_eval_images`). Raises naming both locations
        when two sets of one stage get the same name, and naming the set when it has no usable image.
        Also run by :meth:`setup` (``fit``/``validate``: validation sets; ``test``: test sets); call it
        with ``"all"`` before training to also check the test sets of a ``train.py test=true`` run.

        Returns :attr:`skipped_eval_images`.
        """
        if stage not in ("val", "test", "all"):
            raise ValueError(f"stage must be 'val', 'test' or 'all', got {stage!r}")
        if "sample" in [s.lower() for s in self._all_specs()]:
            prepare_sample(self.sample_dir)  # idempotent; the files must exist to be checked
        for current in (["val", "test"] if stage == "all" else [stage]):
            if current in self._checked_sets:
                continue
            checked: list[tuple[str, list[ImageRecord]]] = []
            locations: dict[str, str] = {}
            for spec in self._eval_specs(current):
                skipped: list[str] = []
                name, records, location = self._resolve(spec, train=False, skipped=skipped)
                if name in locations:
                    raise ValueError(
                        f"{'validation' if current == 'val' else 'test'} sets {locations[name]} and {location} both "
                        f"get the name {name!r} (a set is named after its folder, or after the folder above a "
                        f"folder called HR); metrics are logged per set name, so rename or move one of them"
                    )
                locations[name] = location
                kept, reasons = [], {}
                for record in records:
                    problem = self._eval_image_problem(record)
                    if problem is None:
                        kept.append(record)
                    elif self.on_error == "raise":
                        raise type(problem)(f"{problem} (set {name!r}; data.on_error=skip leaves such images out)")
                    else:
                        skipped.append(str(record.hr_path))
                        reasons[str(record.hr_path)] = str(problem)
                self._note_skipped(name, skipped, reasons)
                if not kept:
                    raise ValueError(f"evaluation set {name!r} ({location}) has no usable images"
                                     + (f": all {len(skipped)} were skipped" if skipped else ""))
                checked.append((name, kept))
            self._checked_sets[current] = checked
        return self.skipped_eval_images

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

    def _eval_datasets(self, stage: str) -> list[SREvalDataset]:
        self.check_eval_sets(stage)
        datasets = []
        for name, records in self._checked_sets[stage]:
            dataset = SREvalDataset(records, self.scale, self.degradation, name, self._cache, self.rgb_range,
                                    self.eval_seed, self.on_error)
            self._note_skipped(name, dataset.skipped)  # decoding failures found while building the set
            datasets.append(dataset)
        return datasets

    def setup(self, stage: str | None = None) -> None:
        if "sample" in [s.lower() for s in self._all_specs()]:
            prepare_sample(self.sample_dir)  # idempotent; covers use without prepare_data()
        # Evaluation sets first: a bad validation image must stop the run before hours of training.
        if stage in (None, "fit", "validate"):
            self.check_eval_sets("val")
        if stage in (None, "test"):
            self.check_eval_sets("test")
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.train_set:
                raise ValueError("training needs data.train_set (e.g. 'sample', 'DIV2K' or a folder)")
            _, records, _ = self._resolve(self.train_set, train=True)
            self.train_dataset = SRTrainDataset(records, self.scale, self.degradation, self.patch_size,
                                                self.iters_per_epoch * self.batch_size * distributed_world_size(),
                                                self._cache, self.rgb_range,
                                                self.augment, self.on_error)
        if stage in (None, "fit", "validate") and not self.val_datasets:
            self.val_datasets = self._eval_datasets("val")
        if stage in (None, "test") and not self.test_datasets:
            self.test_datasets = self._eval_datasets("test")

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
        # and a resumed run sees the same patches as an uninterrupted one, even from inside an epoch.
        loader = ResumableTrainLoader(self.train_dataset, batch_size=self.batch_size, drop_last=True,
                                      sampler=TrainPatchSampler(self.train_dataset), **self._loader_kwargs())
        loader.consumed_batches = self._consumed_training_batches
        return loader

    def _consumed_training_batches(self) -> int:
        """Batches the training loop has used in the current epoch (saved with mid-epoch checkpoints)."""
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

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
