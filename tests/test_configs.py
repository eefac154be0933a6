"""Hydra configs compose and instantiate for every experiment; invalid settings fail first, naming the key."""

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dlsn.utils.config import ConfigError, register_resolvers, validate_config
from dlsn.utils.instantiate import build_network, count_parameters, network_config

from tests.helpers.runs import PROJECT_ROOT, run_script

CONFIG_DIR = str(PROJECT_ROOT / "configs")
EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "configs" / "experiment").glob("*.yaml"))
# The paper recipes (experiment=ablation_attention is tested with the plug-in EDSR, tests/test_edsr.py).
PAPER_EXPERIMENTS = [e for e in EXPERIMENTS if e not in ("quickstart", "ablation_attention")]


def compose_config(name="train", overrides=()):
    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def build_all(cfg):
    """What train.py builds before training: the data module, the network and the LightningModule."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    net = build_network(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net, network_config(cfg.model), _convert_="all")
    return datamodule, net, module


def test_default_train_config_is_the_quickstart(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config()
    validate_config(cfg)
    assert cfg.model._target_ == "dlsn.models.DLSN" and cfg.model.n_feats < 256
    assert cfg.data._target_ == "dlsn.data.SRDataModule" and cfg.data.train_set == "sample"
    assert cfg.trainer.accelerator == "auto"
    assert (cfg.scale, cfg.degradation) == (2, "BI")
    # Short schedule of the quickstart (experiment=quickstart is the default).
    assert cfg.trainer.max_epochs * cfg.data.iters_per_epoch <= 1000 and cfg.module.scheduler.milestones[-1] < cfg.trainer.max_epochs
    assert list(cfg.logger) == ["wandb"] and cfg.logger.wandb.mode == "offline"
    # Keys the sweep configs refer to.
    for key in ("module.optimizer.lr", "model.n_hashes", "model.chunk_size"):
        assert OmegaConf.select(cfg, key) is not None, key


def test_paper_configuration():
    cfg = compose_config(overrides=["experiment=dlsn_x2"])
    model = {k: cfg.model[k] for k in ("n_feats", "n_resgroups", "n_resblocks", "reduction", "chunk_size", "n_hashes", "res_scale")}
    assert model == dict(n_feats=256, n_resgroups=10, n_resblocks=4, reduction=4, chunk_size=128, n_hashes=3, res_scale=0.1)
    assert cfg.init_from is None
    optimizer, scheduler = cfg.module.optimizer, cfg.module.scheduler
    assert optimizer._target_ == "torch.optim.Adam" and scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert list(optimizer.betas) == [0.9, 0.999] and optimizer.eps == 1e-8 and optimizer.lr == 1e-4
    assert list(scheduler.milestones) == [300, 600, 900, 1200] and scheduler.gamma == 0.5
    assert cfg.module.scheduler_interval == "epoch"


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_experiment_composes_validates_and_instantiates(experiment, tmp_path):
    cfg = compose_config(overrides=[f"experiment={experiment}"])
    if cfg.init_from:  # the x2 checkpoint the fine-tuning recipes start from must exist
        with pytest.raises(ConfigError, match=r"'init_from' = .*dlsn_x2.ckpt': file not found"):
            validate_config(cfg)
        (tmp_path / "x2.ckpt").write_bytes(b"")
        cfg = compose_config(overrides=[f"experiment={experiment}", f"init_from={tmp_path / 'x2.ckpt'}"])
    cfg.trainer.accelerator = "cpu"  # the recipes ask for a GPU, which this machine may not have
    validate_config(cfg)
    net = build_network(cfg.model)
    assert net.scale == cfg.scale
    assert count_parameters(net) > 10_000_000  # the paper-size DLSN
    datamodule = hydra.utils.instantiate(cfg.data)
    assert (datamodule.scale, datamodule.degradation) == (cfg.scale, cfg.degradation)
    assert (cfg.data.patch_size, cfg.data.batch_size, cfg.data.iters_per_epoch) == (48, 16, 1000)
    module = hydra.utils.instantiate(cfg.module, net, network_config(cfg.model), _convert_="all")
    assert module.compile_options["enabled"] == "auto"  # compiled on CUDA
    assert cfg.callbacks.cudnn_autotune._target_ == "dlsn.callbacks.CudnnAutotune"
    if experiment == "dlsn_x2":
        assert cfg.trainer.max_epochs == 1500 and cfg.init_from is None
    else:  # fine-tuned from x2
        assert cfg.trainer.max_epochs == 200 and list(cfg.module.scheduler.milestones) == [50, 100, 150]
        assert cfg.init_from


def test_experiment_scales_and_degradations():
    expected = {"dlsn_x2": (2, "BI"), "dlsn_x3": (3, "BI"), "dlsn_x4": (4, "BI"), "dlsn_bd_x3": (3, "BD"), "dlsn_dn_x3": (3, "DN")}
    assert set(PAPER_EXPERIMENTS) == set(expected)
    for experiment, (scale, degradation) in expected.items():
        cfg = compose_config(overrides=[f"experiment={experiment}"])
        assert (cfg.scale, cfg.degradation, cfg.model.scale, cfg.data.scale) == (scale, degradation, scale, scale)


@pytest.mark.parametrize("group,option", [
    ("trainer", "cpu"), ("logger", "csv"), ("logger", "none"), ("logger", "tensorboard"), ("callbacks", "ema"),
    ("debug", "fast"), ("debug", "overfit"), ("inference", "tile"), ("inference", "self_ensemble"), ("model", "bicubic"),
    ("module/optimizer", "adamw"), ("module/scheduler", "cosine"), ("module/scheduler", "warmup_cosine"),
    ("trainer", "ddp_cpu"), ("debug", "profile"),
])
def test_group_options_compose_and_build(group, option):
    cfg = compose_config(overrides=[f"{group}={option}"])
    validate_config(cfg)
    module = build_all(cfg)[2]
    if option != "bicubic":  # nothing to optimise
        module.configure_optimizers()


def test_warmup_cosine_schedule_warms_up_then_decays():
    cfg = compose_config(overrides=["module/scheduler=warmup_cosine", "module.scheduler.warmup=2", "trainer.max_epochs=6"])
    module = build_all(cfg)[2]
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = cfg.module.optimizer.lr
    assert rates[0] == pytest.approx(peak * 1e-3) and rates[1] < rates[2] == pytest.approx(peak)
    assert rates[2] > rates[4] > rates[6]


@pytest.mark.parametrize("option", ["gpu", "ddp"])
def test_gpu_trainers_compose_and_name_the_missing_device(option):
    import torch

    cfg = compose_config(overrides=[f"trainer={option}"])
    if torch.cuda.is_available():
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            validate_config(cfg)


def test_eval_config_contract_overrides():
    cfg = compose_config("eval", ["model=bicubic", "data.benchmark_dir=/some/dir", "data.test_sets=[Set5,Set14]", "scale=3", "degradation=BI"])
    validate_config(cfg)
    assert cfg.data.benchmark_dir == "/some/dir" and list(cfg.data.test_sets) == ["Set5", "Set14"]
    assert cfg.model.scale == 3 and cfg.data.scale == 3


@pytest.mark.parametrize("override,key,message", [
    ("scale=5", "model", "DLSN: scale must be 3 or a power of two (2, 4, 8), got 5"),
    ("degradation=XX", "data", "XX"),
    ("model.chunk_size=0", "model", "chunk_size must be a positive integer, got 0"),
    ("model.n_hashes=two", "model", "n_hashes must be a positive integer, got 'two'"),
    ("model.n_feats=30", "model", "channels (30) must be divisible by reduction (4)"),
    ("+model.n_hash=3", "model", "unexpected keyword argument 'n_hash'"),
    ("module.optimizer.lr=-1", "module", "Invalid learning rate: -1"),
    ("+module.optimizer.momentum=0.9", "module", "unexpected keyword argument 'momentum'"),
    ("inference.mode=quadrants", "module", "inference.mode must be one of whole, chop, tile; got 'quadrants'"),
    ("inference.overlap=200", "module", "inference.overlap (200) must be smaller than inference.tile_size (128)"),
    ("module.skip_factor=0.5", "module", "skip_factor must be a number > 1 or None, got 0.5"),
    ("module.compile=sometimes", "module", "compile must be true, false, 'auto'"),
])
def test_invalid_values_fail_when_built_naming_the_key(override, key, message):
    """Each component checks its own settings; Hydra names the config key of the failing constructor."""
    cfg = compose_config(overrides=[override])
    validate_config(cfg)  # nothing here contradicts another key
    with pytest.raises(hydra.errors.InstantiationException) as info:
        build_all(cfg)
    assert message in str(info.value) and f"full_key: {key}" in str(info.value)


@pytest.mark.parametrize("override,message", [
    ("model.scale=3", "'model.scale' = 3 differs from 'scale' = 2"),
    ("init_from=/no/such/file.ckpt", "'init_from' = '/no/such/file.ckpt': file not found"),
    ("ckpt_path=/no/such/last.ckpt", "'ckpt_path' = '/no/such/last.ckpt': file not found"),
])
def test_contradicting_keys_and_missing_files_are_refused_before_anything_is_built(override, message):
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(overrides=[override]))
    assert message in str(info.value)


def test_unknown_override_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="n_hash"):
        compose_config(overrides=["model.n_hash=3"])


def test_train_script_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("train.py", run_dir, "scale=5", expect_success=False)
    assert proc.returncode != 0
    assert "scale must be 3 or a power of two (2, 4, 8), got 5" in proc.stderr and "full_key: model" in proc.stderr
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "wandb").exists()


def test_printing_the_resolved_job_config_works_and_names_the_run_after_its_overrides():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "--cfg", "job", "--resolve", "model.n_hashes=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: train-model.n_hashes=2" in proc.stdout and "- model.n_hashes=2" in proc.stdout
