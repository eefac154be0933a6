"""train.py options that only matter where the parts join: init_from fine-tuning and gradient clipping.

Each test runs the real train.py (subprocess, tiny DLSN) with tests/helpers/probes.py's RecordTraining
callback added through a Hydra override, and checks what the Trainer actually did with the weights and
gradients. All `slow` (a few train.py runs).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.runs import TINY_TRAIN, requires_official_fixtures, run_script
from tests.helpers.joins import OFFICIAL_TINY_MODEL, official_tiny_fixture, official_tiny_network
from tests.helpers.probes import load_records, probe_overrides

pytestmark = pytest.mark.slow

UPSAMPLER = "net.upsampler."  # DLSN's scale-dependent part, re-initialised when the scale changes
ONE_STEP = ["data.iters_per_epoch=1", "trainer.max_epochs=1"]


def assert_fine_tune_start(start: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """At step 0 every weight equals the source's except the upsampler, which starts afresh."""
    upsampler = [key for key in start if key.startswith(UPSAMPLER)]
    assert upsampler, sorted(start)
    for key, value in start.items():
        if key.startswith(UPSAMPLER):
            same_shape = key in source and source[key].shape == value.shape
            assert not (same_shape and torch.equal(value, source[key])), f"{key} was loaded, not re-initialised"
            assert torch.isfinite(value).all(), key
        else:
            assert torch.equal(value, source[key]), f"{key} differs from init_from's"


def test_fine_tuning_an_x2_checkpoint_at_x3_starts_from_its_weights(tiny_train_run, tmp_path):
    source_path = tiny_train_run / "checkpoints" / "last.ckpt"
    source = torch.load(source_path, map_location="cpu", weights_only=True)["state_dict"]
    run_dir = tmp_path / "x3"
    run_script("train.py", run_dir, *TINY_TRAIN, *ONE_STEP, "scale=3", f"init_from={source_path}",
               *probe_overrides(tmp_path / "probe"))
    [record] = load_records(tmp_path / "probe")
    assert_fine_tune_start(record["initial"], source)
    assert record["initial"][UPSAMPLER + "0.weight"].shape[0] == 9 * 8  # x3: one conv F -> 9F
    # and training went on from there
    assert not torch.equal(record["after_batch"][0]["net.head.weight"], record["initial"]["net.head.weight"])


@requires_official_fixtures()
def test_fine_tuning_the_authors_x2_file_at_x4_starts_from_its_weights(tmp_path):
    weights = tmp_path / "DLSN_x2.pt"
    torch.save(official_tiny_fixture()["state_dict"], weights)
    source = {f"net.{key}": value for key, value in official_tiny_network(scale=2).state_dict().items()}
    tiny_model = [o for o in TINY_TRAIN if not o.startswith("model")]
    run_script("train.py", tmp_path / "x4", *tiny_model, *OFFICIAL_TINY_MODEL, *ONE_STEP, "scale=4",
               f"init_from={weights}", *probe_overrides(tmp_path / "probe"))
    [record] = load_records(tmp_path / "probe")
    # x4's first upsampling conv has the shape of x2's: it must still start afresh.
    assert record["initial"][UPSAMPLER + "0.weight"].shape == source[UPSAMPLER + "0.weight"].shape
    assert_fine_tune_start(record["initial"], source)


def test_grad_clip_reaches_the_trainer(tmp_path):
    clip = 1e-3  # far below the tiny network's gradient norms (about 0.1 - 1)
    run_script("train.py", tmp_path / "run", *TINY_TRAIN, f"trainer.gradient_clip_val={clip}", *probe_overrides(tmp_path / "probe"))
    [record] = load_records(tmp_path / "probe")
    before, at_step = record["grad_norm_before_clip"], record["grad_norm_at_step"]
    assert len(before) == len(at_step) == 3  # data.iters_per_epoch optimizer steps
    assert min(before) > clip  # so every step had to be clipped
    for unclipped, used in zip(before, at_step):
        # torch.nn.utils.clip_grad_norm_: g * clip / (|g| + 1e-6) when |g| > clip
        assert used == pytest.approx(clip * unclipped / (unclipped + 1e-6), rel=1e-6)
