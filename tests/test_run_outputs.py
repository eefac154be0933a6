"""What a real train.py / eval.py run reports: its W&B run (offline), the quickstart's bicubic line, test=true.

One tiny training run with the default logger (logger/wandb.yaml, WANDB_MODE=offline), compare_bicubic and
test=true, and one eval.py run with W&B on its best checkpoint; the tests read what W&B wrote to disk
(tests/helpers/joins.py parses the offline run) and the printed output, and recompute the numbers through
the public API. All `slow` (two subprocess runs shared by the module).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers.runs import TINY_TRAIN, run_script
from tests.helpers.joins import evaluation_batches, mean_psnr_ssim, the_wandb_run, wandb_run_id_for_directory

pytestmark = pytest.mark.slow

EPOCHS = 2
PANEL_CROP = 48  # module.panel_crop (LR pixels)
WITH_WANDB = [o for o in TINY_TRAIN if not o.startswith(("logger=", "compare_bicubic="))] + ["logger=wandb"]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb_train") / "run"
    proc = run_script("train.py", run_dir, *WITH_WANDB, f"trainer.max_epochs={EPOCHS}", "compare_bicubic=true",
                      "test=true", wandb_mode="offline")
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def eval_run(train_run, tmp_path_factory):
    run_dir, _ = train_run
    out = tmp_path_factory.mktemp("wandb_eval") / "eval"
    run_script("eval.py", out, f"ckpt_path={run_dir}/checkpoints/best.ckpt", "data=sample", "data.num_workers=0",
               "trainer.accelerator=cpu", "extras.print_config=false", wandb_mode="offline")
    return out


@pytest.fixture(scope="module")
def validation_images(tmp_path_factory):
    """The sample set's validation batches as the run's SRDataModule served them."""
    [batches] = evaluation_batches(["sample"], scale=2, stage="validate",
                                   sample_dir=tmp_path_factory.mktemp("sample_images"))
    return batches


def tiny_network_from(checkpoint_path):
    from dlsn.models import DLSN

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    net = DLSN(2, n_feats=8, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=1)
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    net.eval().set_rotation_seed(0)
    return net


def test_wandb_run_is_identified_by_its_run_directory(train_run):
    run_dir, _ = train_run
    run = the_wandb_run(run_dir)
    # A restarted job in the same directory continues this very run (resume: allow).
    assert run.run_id == wandb_run_id_for_directory(str(run_dir))
    assert run.directory.name.endswith(f"-{run.run_id}")
    assert run.group == ""  # a single run is in no group
    assert (run.project, run.job_type) == ("dlsn", "train")
    # Named after the task and the command-line overrides, so sweep jobs are told apart at a glance.
    assert run.name.startswith("train-model=dlsn_small,model.n_feats=8,") and len(run.name) <= 128


def test_wandb_records_the_resolved_config_and_parameter_count(train_run):
    from dlsn.models import DLSN

    run_dir, _ = train_run
    config = the_wandb_run(run_dir).config
    assert config["model"]["n_feats"] == 8 and config["model"]["n_hashes"] == 1
    assert config["model"]["_target_"] == "dlsn.models.DLSN"
    assert config["module"]["optimizer"]["lr"] == pytest.approx(1e-4) and config["data"]["patch_size"] == 12
    assert config["trainer"]["max_epochs"] == EPOCHS and config["scale"] == 2 and config["degradation"] == "BI"
    tiny = DLSN(2, n_feats=8, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=1)
    assert config["model/params"] == sum(p.numel() for p in tiny.parameters())


def test_wandb_logs_train_and_validation_metrics(train_run):
    run_dir, _ = train_run
    run = the_wandb_run(run_dir)
    assert len(run.values("train/loss_step")) == EPOCHS * 3  # log_every_n_steps=1, 3 steps per epoch
    assert len(run.values("val/sample/psnr")) == EPOCHS
    assert run.values("val/psnr_best")[-1] == pytest.approx(max(run.values("val/psnr")))


def test_wandb_image_panel_shows_lr_sr_hr_crops_of_the_validation_images(train_run, validation_images):
    run_dir, _ = train_run
    run = the_wandb_run(run_dir)
    panels = [row for row in run.history if "val/samples/filenames" in row]
    assert len(panels) == EPOCHS  # one panel per validation (none for the sanity check)
    names = [batch["name"][0] for batch in validation_images]
    last = panels[-1]
    assert last["val/samples/captions"] == [f"{name}: LR | SR | HR" for name in names]
    net = tiny_network_from(run_dir / "checkpoints" / "last.ckpt")  # the weights of the last validation
    for filename, batch in zip(last["val/samples/filenames"], validation_images):
        panel = np.asarray(Image.open(run.file(filename)).convert("RGB")).astype(np.int16)
        lr, hr = batch["lr"], batch["hr"]
        height, width = lr.shape[-2:]
        crop = min(PANEL_CROP, height, width)
        top, left = (height - crop) // 2, (width - crop) // 2
        hr_rows, hr_cols = slice(2 * top, 2 * (top + crop)), slice(2 * left, 2 * (left + crop))
        with torch.no_grad():
            sr = net(lr).clamp(0, 1)
        expected = {
            "LR": F.interpolate(lr[..., top:top + crop, left:left + crop], scale_factor=2, mode="nearest"),
            "SR": sr[..., hr_rows, hr_cols],
            "HR": hr[..., hr_rows, hr_cols],
        }
        side = 2 * crop
        assert panel.shape == (side, 3 * side, 3), panel.shape
        for index, (part, image) in enumerate(expected.items()):
            levels = (image[0] * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
            shown = panel[:, index * side:(index + 1) * side]
            # SR may differ by a level where float32 rounding straddles .5; LR and HR are exact.
            assert np.abs(shown - levels).max() <= (1 if part == "SR" else 0), f"{filename}: {part} part"
        assert np.abs(panel[:, side:2 * side] - panel[:, 2 * side:]).mean() > 5  # SR is not HR


def test_compare_bicubic_prints_the_model_and_bicubic_psnr(train_run, validation_images):
    from dlsn.models import Bicubic

    run_dir, stdout = train_run
    match = re.search(r"\[sample\] model PSNR (\d+\.\d\d) dB, bicubic PSNR (\d+\.\d\d) dB", stdout)
    assert match, stdout[-2000:]
    printed_model, printed_bicubic = map(float, match.groups())
    last_validation = the_wandb_run(run_dir).values("val/sample/psnr")[-1]
    with torch.no_grad():
        bicubic, _ = mean_psnr_ssim([(Bicubic(2)(batch["lr"]), batch) for batch in validation_images], scale=2)
    assert printed_model == pytest.approx(last_validation, abs=0.005 + 1e-9)
    assert printed_bicubic == pytest.approx(bicubic, abs=0.005 + 1e-9)


def test_test_true_tests_the_best_checkpoint(train_run):
    run_dir, _ = train_run
    run = the_wandb_run(run_dir)
    validated = run.values("val/sample/psnr")
    [tested] = run.values("test/sample/psnr")
    assert tested == pytest.approx(max(validated), abs=1e-6)  # best.ckpt: the best validation PSNR
    assert len(run.values("test/sample/ssim")) == 1


def test_eval_logs_its_results_table_to_wandb(eval_run):
    results = json.loads((eval_run / "results.json").read_text())
    run = the_wandb_run(eval_run)
    assert run.run_id == wandb_run_id_for_directory(str(eval_run)) and run.job_type == "eval"
    [path] = run.values("test/results/path")
    table = json.loads(run.file(path).read_text())
    assert table["columns"] == ["method", "scale", "degradation", "set", "psnr", "ssim", "images"]
    [row] = table["data"]
    assert row[:4] == ["DLSN", 2, "BI", "sample"] and row[6] == results["sample"]["n"] == 2
    assert row[4] == pytest.approx(results["sample"]["psnr"], abs=1e-9)
    assert row[5] == pytest.approx(results["sample"]["ssim"], abs=1e-9)
