"""Hydra configs compose and instantiate for every experiment; invalid settings fail first, naming the key."""

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dlsn.utils import ConfigError, build_network, count_parameters, validate_config

from conftest import PROJECT_ROOT, run_script

CONFIG_DIR = str(PROJECT_ROOT / "configs")
EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "configs" / "experiment").glob("*.yaml"))
PAPER_EXPERIMENTS = [e for e in EXPERIMENTS if e != "quickstart"]


def compose_config(name="train", overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_default_train_config_is_the_quickstart():
    cfg = compose_config()
    validate_config(cfg, "train")
    assert cfg.model._target_ == "dlsn.models.DLSN" and cfg.model.n_feats < 256
    assert cfg.data._target_ == "dlsn.data.SRDataModule" and cfg.data.train_set == "sample"
    assert cfg.trainer.accelerator == "auto"
    assert (cfg.scale, cfg.degradation) == (2, "BI")
    # Short schedule of the quickstart (experiment=quickstart is the default).
    assert cfg.trainer.max_epochs * cfg.data.iters_per_epoch <= 1000 and cfg.optim.milestones[-1] < cfg.trainer.max_epochs
    assert list(cfg.logger) == ["wandb"] and cfg.logger.wandb.offline is True
    # Keys the sweep configs refer to.
    for key in ("optim.lr", "model.n_hashes", "model.chunk_size"):
        assert OmegaConf.select(cfg, key) is not None, key


def test_paper_configuration():
    cfg = compose_config(overrides=["experiment=dlsn_x2"])
    model = {k: cfg.model[k] for k in ("n_feats", "n_resgroups", "n_resblocks", "reduction", "chunk_size", "n_hashes", "res_scale")}
    assert model == dict(n_feats=256, n_resgroups=10, n_resblocks=4, reduction=4, chunk_size=128, n_hashes=3, res_scale=0.1)
    assert cfg.model.pretrained is None
    assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.eps == 1e-8 and cfg.optim.lr == 1e-4
    assert list(cfg.optim.milestones) == [300, 600, 900, 1200] and cfg.optim.gamma == 0.5


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_experiment_composes_validates_and_instantiates(experiment, tmp_path):
    cfg = compose_config(overrides=[f"experiment={experiment}"])
    if cfg.model.pretrained:  # the x2 checkpoint the fine-tuning recipes start from must exist
        with pytest.raises(ConfigError, match=r"'model.pretrained' = .*dlsn_x2.ckpt': file not found"):
            validate_config(cfg, "train")
        (tmp_path / "x2.ckpt").write_bytes(b"")
        cfg = compose_config(overrides=[f"experiment={experiment}", f"model.pretrained={tmp_path / 'x2.ckpt'}"])
    validate_config(cfg, "train")
    net = build_network(cfg.model, load_weights=False)
    assert net.scale == cfg.scale
    assert count_parameters(net) > 10_000_000  # the paper-size DLSN
    datamodule = hydra.utils.instantiate(cfg.data)
    assert (datamodule.scale, datamodule.degradation) == (cfg.scale, cfg.degradation)
    assert (cfg.data.patch_size, cfg.data.batch_size, cfg.data.iters_per_epoch) == (48, 16, 1000)
    if experiment == "dlsn_x2":
        assert cfg.trainer.max_epochs == 1500 and cfg.model.pretrained is None
    else:  # fine-tuned from x2
        assert cfg.trainer.max_epochs == 200 and list(cfg.optim.milestones) == [50, 100, 150]
        assert cfg.model.pretrained


def test_experiment_scales_and_degradations():
    expected = {"dlsn_x2": (2, "BI"), "dlsn_x3": (3, "BI"), "dlsn_x4": (4, "BI"), "dlsn_bd_x3": (3, "BD"), "dlsn_dn_x3": (3, "DN")}
    assert set(PAPER_EXPERIMENTS) == set(expected)
    for experiment, (scale, degradation) in expected.items():
        cfg = compose_config(overrides=[f"experiment={experiment}"])
        assert (cfg.scale, cfg.degradation, cfg.model.scale, cfg.data.scale) == (scale, degradation, scale, scale)


@pytest.mark.parametrize("group,option", [
    ("trainer", "cpu"), ("trainer", "gpu"), ("trainer", "ddp"), ("logger", "csv"), ("logger", "none"),
    ("logger", "tensorboard"), ("callbacks", "ema"), ("debug", "fast"), ("debug", "overfit"), ("inference", "tile"),
    ("inference", "self_ensemble"), ("model", "bicubic"),
])
def test_group_options_compose(group, option):
    cfg = compose_config(overrides=[f"{group}={option}"])
    validate_config(cfg, "train")


def test_eval_config_contract_overrides():
    cfg = compose_config("eval", ["model=bicubic", "data.benchmark_dir=/some/dir", "data.test_sets=[Set5,Set14]", "scale=3", "degradation=BI"])
    validate_config(cfg, "eval")
    assert cfg.data.benchmark_dir == "/some/dir" and list(cfg.data.test_sets) == ["Set5", "Set14"]
    assert cfg.model.scale == 3 and cfg.data.scale == 3


@pytest.mark.parametrize("override,message", [
    ("scale=5", "'scale' = 5: allowed values are 2, 3, 4"),
    ("degradation=XX", "'degradation' = 'XX': allowed values are BI, BD, DN"),
    ("model.chunk_size=0", "'model.chunk_size' = 0: expected an integer >= 1"),
    ("model.n_hashes=two", "'model.n_hashes' = 'two' has the wrong type; expected int"),
    ("model.n_feats=30", "'model.n_feats' = 30 must be divisible by 'model.reduction' = 4"),
    ("+model.n_hash=3", "unknown key 'model.n_hash'"),
    ("optim.lr=fast", "optim"),
    ("optim.milestones=[600,300]", "'optim.milestones' = [600, 300]"),
    ("+optim.momentum=0.9", "unknown key 'optim.momentum'"),
    ("inference.mode=quadrants", "'inference.mode' = 'quadrants': allowed values are whole, chop, tile"),
    ("inference.overlap=200", "'inference.overlap' = 200 must be smaller than inference.tile_size"),
    ("module.skip_factor=0.5", "'module.skip_factor' = 0.5"),
    ("seed=abc", "'seed' = 'abc'"),
])
def test_invalid_values_are_rejected_naming_the_key(override, message):
    cfg = compose_config(overrides=[override])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, "train")
    assert message in str(info.value)


def test_unknown_override_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="n_hash"):
        compose_config(overrides=["model.n_hash=3"])


def test_train_script_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("train.py", run_dir, "scale=5", expect_success=False)
    assert proc.returncode != 0
    assert "'scale' = 5: allowed values are 2, 3, 4" in proc.stderr
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "wandb").exists()
