"""SRDataModule: contract with the training suite, Hydra configs, workers."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlsn.data import SRDataModule
from data_helpers import BENCHMARKS, requires_shared, sample_dir  # noqa: F401 - fixture

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def make_dm(tmp_path, sample_dir, **kwargs):
    args = dict(scale=2, degradation="BI", patch_size=12, batch_size=4, iters_per_epoch=3, num_workers=0,
                cache_dir=tmp_path / "cache", sample_dir=sample_dir)
    args.update(kwargs)
    return SRDataModule(**args)


def test_train_batches_follow_the_contract(tmp_path, sample_dir):
    dm = make_dm(tmp_path, sample_dir, rgb_range=255.0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 3 and len(dm.train_dataset) == 12
    batch = next(iter(loader))
    assert set(batch) == {"lr", "hr", "name"}
    assert batch["lr"].shape == (4, 3, 12, 12) and batch["hr"].shape == (4, 3, 24, 24)
    assert batch["lr"].dtype == torch.float32 and len(batch["name"]) == 4
    assert 0 <= batch["hr"].min() and batch["hr"].max() <= 255 and batch["hr"].max() > 1
    # values are uint8 levels * rgb_range / 255
    torch.testing.assert_close(batch["hr"], batch["hr"].round())


def test_val_and_test_loaders_are_lists_of_full_images(tmp_path, sample_dir):
    dm = make_dm(tmp_path, sample_dir, scale=3)
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert dm.val_set_names == ["sample"] and len(loaders) == 1
    batches = list(loaders[0])
    assert [b["name"] for b in batches] == [["coffee"], ["immunohistochemistry"]]
    for b in batches:
        assert b["lr"].shape[0] == 1
        assert b["hr"].shape[-2] == 3 * b["lr"].shape[-2] and b["hr"].shape[-1] == 3 * b["lr"].shape[-1]
        assert max(b["hr"].shape[-2:]) <= 256
        assert 0 <= b["lr"].min() and b["lr"].max() <= 1
    dm.setup("test")
    assert dm.test_set_names == ["sample"]  # empty test_sets: test on the validation sets


@requires_shared
def test_benchmark_sets_for_testing(tmp_path, sample_dir):
    dm = make_dm(tmp_path, sample_dir, benchmark_dir=BENCHMARKS, test_sets=["Set5", "Set14"], scale=4)
    dm.setup("test")
    assert dm.test_set_names == ["Set5", "Set14"]
    loaders = dm.test_dataloader()
    assert [len(loader) for loader in loaders] == [5, 14]
    first = next(iter(loaders[0]))
    assert first["name"] == ["img_001"] and first["hr"].shape[-1] == 4 * first["lr"].shape[-1]


def test_invalid_arguments(tmp_path, sample_dir):
    with pytest.raises(ValueError, match=r"\['BI', 'BD', 'DN'\], got 'XY'"):
        make_dm(tmp_path, sample_dir, degradation="XY")
    with pytest.raises(ValueError, match="scale"):
        make_dm(tmp_path, sample_dir, scale=2.5)
    with pytest.raises(ValueError, match="batch_size"):
        make_dm(tmp_path, sample_dir, batch_size=0)
    dm = make_dm(tmp_path, sample_dir, val_sets=["NoSuchSet"])
    with pytest.raises(FileNotFoundError, match="NoSuchSet"):
        dm.setup("validate")
    with pytest.raises(ValueError, match="div2k_dir"):
        make_dm(tmp_path, sample_dir, train_set="DIV2K").setup("fit")


def test_workers_draw_different_reproducible_patches(tmp_path, sample_dir):
    def first_batches(seed):
        dm = make_dm(tmp_path, sample_dir, num_workers=2, persistent_workers=False, iters_per_epoch=2, batch_size=2)
        dm.setup("fit")
        torch.manual_seed(seed)
        return [b["lr"] for b in dm.train_dataloader()]

    a, b = first_batches(0), first_batches(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible
    assert not torch.equal(a[0], a[1])  # worker 0 and worker 1 differ
    assert not torch.equal(first_batches(1)[0], a[0])


def test_folder_sets_and_eval_loader_method(tmp_path, sample_dir):
    dm = make_dm(tmp_path, sample_dir, train_set=str(sample_dir / "train"), val_sets=[str(sample_dir / "val")])
    dm.setup("fit")
    assert dm.val_set_names == ["val"]
    loader = dm._eval_loader(dm.val_datasets[0])
    assert loader.batch_size == 1 and isinstance(loader.sampler, torch.utils.data.SequentialSampler)


@pytest.mark.parametrize("name", ["sample", "benchmark", "div2k", "folder"])
def test_hydra_configs_compose_with_shared_keys(name):
    cfg = OmegaConf.create({"scale": 3, "degradation": "BD", "data": OmegaConf.load(CONFIGS / f"{name}.yaml")})
    assert cfg.data._target_ == "dlsn.data.SRDataModule"
    assert cfg.data.scale == 3 and cfg.data.degradation == "BD"
    for key in ("patch_size", "batch_size", "iters_per_epoch", "num_workers", "rgb_range", "cache_dir"):
        assert key in cfg.data


def test_hydra_instantiates_benchmark_config_with_eval_overrides(tmp_path, sample_dir):
    cfg = OmegaConf.create({"scale": 4, "degradation": "BI", "data": OmegaConf.load(CONFIGS / "benchmark.yaml")})
    overrides = OmegaConf.from_dotlist([f"data.benchmark_dir={tmp_path}", "data.test_sets=[Set5,Set14]", "scale=3",
                                        f"data.cache_dir={tmp_path / 'c'}", f"+data.sample_dir={sample_dir}"])
    cfg = OmegaConf.merge(cfg, overrides)
    dm = instantiate(cfg.data)
    assert isinstance(dm, SRDataModule) and dm.scale == 3 and dm.test_sets_spec == ["Set5", "Set14"]
    assert dm.benchmark_dir == tmp_path
