"""Small workflow presets of issue 12: per-machine configs (configs/local/), debug=profile, trainer=ddp_cpu."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from dlsn.utils.config import register_resolvers
from tests.helpers.runs import PROJECT_ROOT, TINY_TRAIN, run_script


def compose_train(overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_a_local_config_is_applied_after_the_experiment(tmp_path):
    """configs/local/default.yaml (git-ignored) holds per-machine settings; here one on the search path."""
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text("# @package _global_\npaths:\n  data_dir: /scratch/sr\ntrainer:\n  devices: 3\n")
    cfg = compose_train([f"hydra.searchpath=[file://{tmp_path}]", "experiment=dlsn_x2"])
    assert cfg.paths.data_dir == "/scratch/sr" and cfg.trainer.devices == 3
    assert cfg.paths.div2k_dir == "/scratch/sr/DIV2K"  # the other paths follow
    assert compose_train(["experiment=dlsn_x2"]).trainer.devices == 1  # without the file: the experiment's


def test_ddp_cpu_preset_asks_for_two_cpu_processes():
    trainer = compose_train(["trainer=ddp_cpu"]).trainer
    assert (trainer.accelerator, trainer.devices, trainer.strategy) == ("cpu", 2, "ddp")


def test_debug_profile_writes_the_profiler_report(tmp_path):
    run_dir = tmp_path / "run"
    run_script("train.py", run_dir, *TINY_TRAIN, "debug=profile", "trainer.max_steps=2", "trainer.accelerator=cpu")
    report = (run_dir / "fit-profile.txt").read_text()
    assert "Profiler Report" in report and "run_training_batch" in report
