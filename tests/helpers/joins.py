"""Helpers of the join tests: what a train.py / eval.py run recorded, and reference computations.

The join tests drive the public entry points (train.py / eval.py with Hydra overrides) and compare
what the runs wrote with numbers computed here through the public library API (``dlsn.models``,
``dlsn.metrics``, ``dlsn.data.SRDataModule``). The few library internals they need are imported in
this module only, so a refactor of the wiring changes one line here rather than the tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tests.helpers.runs import OFFICIAL_FIXTURES

# ---- library internals the join tests name (keep them here) ---------------------------------------
from dlsn.sweep import run_id as wandb_run_id_for_directory  # noqa: E402  the id logger/wandb.yaml derives

OFFICIAL_TINY = OFFICIAL_FIXTURES / "dlsn_tiny_x2.pt"
# Model overrides of the official tiny network (its config in the fixture; reduction and res_scale at
# the DLSN defaults, 4 and 0.1, which configs/model/dlsn.yaml also uses).
OFFICIAL_TINY_MODEL = ["model=dlsn", "model.n_feats=32", "model.n_resgroups=2", "model.n_resblocks=2",
                       "model.chunk_size=16", "model.n_hashes=2"]


def official_tiny_fixture() -> dict[str, Any]:
    return torch.load(OFFICIAL_TINY, weights_only=True)


def official_tiny_network(scale: int = 2) -> torch.nn.Module:
    """The fixture's official tiny DLSN loaded through ``dlsn.models.load_official``, in eval mode."""
    from dlsn.models import DLSN, load_official

    fixture = official_tiny_fixture()
    config = {**fixture["config"], "scale": scale}
    return load_official(DLSN(**config), fixture["state_dict"], skip_upsampler=scale != fixture["config"]["scale"]).eval()


def recorded_rotations(run: dict[str, Any], n_hashes: int) -> list[torch.Tensor]:
    """A fixture run's rotations (all rounds of all GLA layers, in draw order) as one tensor per layer."""
    rounds = run["rotations"]
    return [torch.stack(rounds[i:i + n_hashes]) for i in range(0, len(rounds), n_hashes)]


# ---- images and data as eval.py sees them ---------------------------------------------------------


def write_smooth_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """PNG images of smooth random colour fields (bicubic-upsampled noise), one per (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, (height, width) in enumerate(sizes):
        coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(folder / f"img{index}.png")
    return folder


def evaluation_batches(sets: list[str], scale: int, degradation: str = "BI", stage: str = "test", **data_options):
    """The full-image batches ``{"lr", "hr", "name", "gray"}`` that SRDataModule gives train.py/eval.py."""
    from dlsn.data import SRDataModule

    options = dict(scale=scale, degradation=degradation, num_workers=0, cache_dir=None, train_set=None,
                   val_sets=sets, test_sets=sets)
    datamodule = SRDataModule(**{**options, **data_options})
    datamodule.setup(stage)
    loaders = datamodule.test_dataloader() if stage == "test" else datamodule.val_dataloader()
    return [list(loader) for loader in loaders]


def mean_psnr_ssim(pairs, scale: int) -> tuple[float, float]:
    """Mean Y-PSNR / Y-SSIM over ``(sr, batch)`` pairs, with the protocol of ``dlsn.metrics``."""
    from dlsn.metrics import psnr_y, ssim_y

    psnrs, ssims = [], []
    for sr, batch in pairs:
        gray = bool(batch["gray"][0]) if "gray" in batch else False
        psnrs.append(psnr_y(sr, batch["hr"], scale, gray=gray))
        ssims.append(ssim_y(sr, batch["hr"], scale, gray=gray))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th of the 8 flips/transposes of an image batch (bit 0: transpose, 1: flip H, 2: flip W)."""
    if index & 1:
        x = x.transpose(-2, -1)
    if index & 2:
        x = x.flip(-2)
    if index & 4:
        x = x.flip(-1)
    return x


def dihedral_inverse(x: torch.Tensor, index: int) -> torch.Tensor:
    if index & 4:
        x = x.flip(-1)
    if index & 2:
        x = x.flip(-2)
    if index & 1:
        x = x.transpose(-2, -1)
    return x


# ---- what W&B recorded (offline runs) --------------------------------------------------------------

_WANDB_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed records
_WANDB_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (what ``wandb sync`` uploads)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (starts with {data[:7]!r})")
    chunks, pending, position = [], b"", _WANDB_HEADER
    while position + 7 <= len(data):
        left_in_block = _WANDB_BLOCK - position % _WANDB_BLOCK
        if left_in_block < 7:  # block trailer padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            chunks.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            chunks.append(pending + payload)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRun:
    """One offline W&B run as recorded on disk: identity, config (hyperparameters) and history rows."""

    directory: Path
    run_id: str
    group: str
    project: str
    name: str
    job_type: str
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[Any]:
        """Every logged value of ``key``, in logging order."""
        return [row[key] for row in self.history if key in row]

    def file(self, relative: str) -> Path:
        return self.directory / "files" / relative


def wandb_runs(run_dir: Path) -> list[WandbRun]:
    """The offline W&B runs written under ``<run_dir>/wandb`` (logger/wandb.yaml: save_dir = run dir)."""
    runs = []
    for log_file in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run, config, history = None, {}, []
        for record in _wandb_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config.update({_item_key(i): json.loads(i.value_json) for i in run.config.update})
            elif kind == "config":
                config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        assert run is not None, f"{log_file}: no run record"
        config.pop("_wandb", None)
        runs.append(WandbRun(log_file.parent, run.run_id, run.run_group, run.project, run.display_name, run.job_type,
                             list(run.tags), config, history))
    return runs


def the_wandb_run(run_dir: Path) -> WandbRun:
    runs = wandb_runs(run_dir)
    assert len(runs) == 1, f"expected one W&B run under {run_dir}/wandb, found {[r.directory.name for r in runs]}"
    return runs[0]
