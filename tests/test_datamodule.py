"""SRDataModule: contract with the training suite, Hydra configs, workers."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlsn.data import SRDataModule
from tests.helpers.data import BENCHMARKS, requires_shared, sample_dir  # noqa: F401 - fixture

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


# ---------------------------------------------------------------- evaluation sets checked before training


def eval_folder(root: Path, name: str, sizes: dict[str, tuple[int, int]]) -> Path:
    """A folder ``root/name`` with one random PNG per ``{file stem: (height, width)}``."""
    from tests.helpers.data import random_image, save_png

    for i, (stem, (height, width)) in enumerate(sizes.items()):
        save_png(root / name / f"{stem}.png", random_image(height, width, seed=i))
    return root / name


def test_too_small_validation_image_stops_setup_before_training(tmp_path, sample_dir):
    # x4: 19 is the smallest side leaving 11 pixels after the 4-pixel border crop; modcrop makes it 20.
    val = eval_folder(tmp_path, "val", {"ok": (20, 20), "tiny": (10, 10)})
    dm = make_dm(tmp_path, sample_dir, scale=4, val_sets=[str(val)])
    with pytest.raises(ValueError, match=r"tiny\.png is 10x10 pixels.*8x8.*0x0.*11x11.*at least 20x20"):
        dm.setup("fit")
    assert dm.train_dataset is None  # checked before the (slow) training set is built
    from dlsn.metrics import min_hr_size

    assert [min_hr_size(s) for s in (2, 3, 4)] == [16, 18, 20]
    # An image of exactly the minimum size passes and scores.
    val_min = eval_folder(tmp_path, "val_min", {"a": (20, 23)})
    dm = make_dm(tmp_path, sample_dir, scale=4, val_sets=[str(val_min)])
    dm.setup("validate")
    assert len(dm.val_datasets[0]) == 1 and dm.skipped_eval_images == {}
    # Smaller than the scale: the LR image would be empty.
    lr_empty = eval_folder(tmp_path, "lr_empty", {"ok": (40, 40), "line": (3, 40)})
    with pytest.raises(ValueError, match=r"line\.png is 3x40 pixels, smaller than the scale 4"):
        make_dm(tmp_path, sample_dir, scale=4, val_sets=[str(lr_empty)]).setup("validate")


def test_on_error_skip_applies_to_evaluation_images(tmp_path, sample_dir, caplog):
    import logging

    val = eval_folder(tmp_path, "Urban", {"good": (24, 24), "tiny": (10, 10), "other": (30, 26)})
    (val / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    dm = make_dm(tmp_path, sample_dir, scale=4, val_sets=[str(val)], on_error="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup("validate")
    assert [dm.val_datasets[0][i]["name"] for i in range(2)] == ["good", "other"]
    assert {k: sorted(Path(p).name for p in v) for k, v in dm.skipped_eval_images.items()} == {
        "Urban": ["broken.png", "tiny.png"]
    }
    assert "skipped 2 image(s)" in caplog.text and "tiny.png" in caplog.text and "broken.png" in caplog.text
    # Raise mode names the unreadable file.
    from dlsn.data import ImageReadError

    with pytest.raises(ImageReadError, match="broken.png"):
        make_dm(tmp_path, sample_dir, scale=4, val_sets=[str(val)]).check_eval_sets("val")
    # A set with nothing usable left is an error naming the set.
    bad = eval_folder(tmp_path, "AllTiny", {"t1": (8, 8), "t2": (9, 9)})
    with pytest.raises(ValueError, match=r"'AllTiny'.*all 2 were skipped"):
        make_dm(tmp_path, sample_dir, scale=4, val_sets=[str(bad)], on_error="skip").setup("validate")


def test_decoding_failures_found_while_building_are_counted_too(tmp_path, sample_dir):
    """A file whose header is fine but whose pixels are truncated is skipped when the set is built."""
    import io

    from PIL import Image

    from tests.helpers.data import random_image

    val = eval_folder(tmp_path, "val", {"good": (24, 24)})
    buffer = io.BytesIO()
    Image.fromarray(random_image(64, 64)).save(buffer, format="PNG")
    (val / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    dm = make_dm(tmp_path, sample_dir, scale=2, val_sets=[str(val)], on_error="skip")
    dm.setup("validate")
    assert dm.val_set_names == ["val"] and len(dm.val_datasets[0]) == 1
    assert [Path(p).name for p in dm.skipped_eval_images["val"]] == ["cut.png"]


def test_official_lr_file_of_the_wrong_size_is_found_from_its_header(tmp_path, sample_dir):
    from tests.helpers.data import random_image, save_png

    save_png(tmp_path / "SetX" / "HR" / "a.png", random_image(32, 32))
    save_png(tmp_path / "SetX" / "LR_bicubic" / "X2" / "ax2.png", random_image(15, 16))
    dm = make_dm(tmp_path, sample_dir, scale=2, val_sets=["SetX"], benchmark_dir=tmp_path)
    with pytest.raises(ValueError, match=r"ax2\.png has size 15x16, expected 16x16"):
        dm.check_eval_sets("val")


def test_set_names_come_from_the_folder_above_hr_and_must_be_unique(tmp_path, sample_dir):
    from dlsn.data.datamodule import set_name_of_folder

    urban = eval_folder(tmp_path / "a" / "Urban100", "HR", {"x": (24, 24)})
    manga = eval_folder(tmp_path / "b" / "Manga109", "HR", {"y": (24, 24)})
    dm = make_dm(tmp_path, sample_dir, scale=2, val_sets=[str(urban), str(manga)])
    dm.setup("validate")
    assert dm.val_set_names == ["Urban100", "Manga109"]  # not "HR", "HR"
    assert set_name_of_folder(tmp_path / "Set5") == "Set5" and set_name_of_folder(tmp_path / "x" / "hr") == "x"

    other_urban = eval_folder(tmp_path / "b" / "Urban100", "HR", {"z": (24, 24)})
    dm = make_dm(tmp_path, sample_dir, scale=2, val_sets=[str(urban), str(other_urban)])
    with pytest.raises(ValueError, match=r"a/Urban100/HR and .*b/Urban100/HR both get the name 'Urban100'"):
        dm.setup("fit")
    assert dm.train_dataset is None
    # Test sets are checked on their own (the same set may be validated and tested).
    dm = make_dm(tmp_path, sample_dir, scale=2, val_sets=[str(urban)], test_sets=[str(urban), str(urban)])
    dm.setup("validate")
    with pytest.raises(ValueError, match="both get the name 'Urban100'"):
        dm.setup("test")
    with pytest.raises(ValueError, match="both get the name 'Urban100'"):
        make_dm(tmp_path, sample_dir, scale=2, val_sets=[str(urban)], test_sets=[str(urban), str(urban)]).check_eval_sets("all")
