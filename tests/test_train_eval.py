"""train.py and eval.py end to end on CPU (subprocesses, tiny DLSN, a few steps)."""

import json

import pytest
import torch

from tests.helpers.runs import TINY_TRAIN, last_value, read_csv_metrics, requires_official_fixtures, run_script
from tests.helpers.probes import load_records, probe_overrides
from tests.helpers.joins import (
    OFFICIAL_TINY_MODEL,
    dihedral,
    dihedral_inverse,
    evaluation_batches,
    mean_psnr_ssim,
    official_tiny_fixture,
    official_tiny_network,
    write_smooth_images,
)

# Published bicubic PSNR / SSIM (../shared/benchmarks/README.md).
PUBLISHED_BICUBIC = {
    2: {"Set5": (33.66, 0.9299), "Set14": (30.24, 0.8688)},
    3: {"Set5": (30.39, 0.8682), "Set14": (27.55, 0.7742)},
    4: {"Set5": (28.42, 0.8104), "Set14": (26.00, 0.7027)},
}


def test_training_writes_checkpoints_and_metrics(tiny_train_run):
    ckpt_dir = tiny_train_run / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 * 3  # 2 epochs of data.iters_per_epoch=3
    assert last["dlsn_network"]["config"]["n_feats"] == 8  # eval.py rebuilds the network from it
    assert {"optimizer_states", "lr_schedulers", "dlsn_rng_state", "dlsn_training_state"} <= set(last)
    rows = read_csv_metrics(tiny_train_run)
    for key in ("train/loss_step", "train/lr", "train/throughput", "train/skipped_batches", "val/sample/psnr",
                "val/sample/ssim", "val/psnr", "val/psnr_best"):
        assert any(r.get(key) not in (None, "") for r in rows), key
    assert last_value(rows, "val/psnr_best") >= last_value(rows, "val/psnr")
    assert last_value(rows, "train/lr") == pytest.approx(1e-4)


def test_resume_restores_step_optimizer_and_scheduler(tiny_train_run, tmp_path):
    first = tmp_path / "first"
    run_script("train.py", first, *TINY_TRAIN, "trainer.max_epochs=1", "module.scheduler.milestones=[1]")
    saved = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)  # safe to load
    assert saved["global_step"] == 3
    resumed = tmp_path / "resumed"
    run_script("train.py", resumed, *TINY_TRAIN, "trainer.max_epochs=2", "module.scheduler.milestones=[1]",
               f"ckpt_path={first}/checkpoints/last.ckpt")
    continued = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert continued["global_step"] == 6 and continued["epoch"] == 1
    assert int(continued["optimizer_states"][0]["state"][0]["step"]) == 6  # Adam moments carried over
    assert continued["lr_schedulers"][0]["last_epoch"] == 2
    assert continued["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.5e-4)  # halved at epoch 1
    rows = read_csv_metrics(resumed)
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss_step")})
    assert steps and min(steps) >= 3  # logging continued from the saved step


@pytest.mark.slow
@pytest.mark.parametrize("loader", [["data.num_workers=0"], ["data.num_workers=1", "+data.persistent_workers=true"]],
                         ids=["in-process", "persistent-worker"])
def test_resume_is_exact(tmp_path, loader):
    # Patches are drawn from (seed, epoch, index) keys, so the resumed run draws exactly the patches
    # of the uninterrupted one whatever the DataLoader workers do.
    uninterrupted_dir, first, resumed = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    run_script("train.py", uninterrupted_dir, *TINY_TRAIN, *loader, "trainer.max_epochs=2")
    run_script("train.py", first, *TINY_TRAIN, *loader, "trainer.max_epochs=1")
    run_script("train.py", resumed, *TINY_TRAIN, *loader, "trainer.max_epochs=2", f"ckpt_path={first}/checkpoints/last.ckpt")
    uninterrupted = torch.load(uninterrupted_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    continued = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert continued["global_step"] == uninterrupted["global_step"] == 6
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(continued["state_dict"][key], value, rtol=0, atol=0, msg=key)
    adam_before = uninterrupted["optimizer_states"][0]["state"][0]["exp_avg"]
    torch.testing.assert_close(continued["optimizer_states"][0]["state"][0]["exp_avg"], adam_before, rtol=0, atol=0)


def test_eval_reproduces_the_metric_logged_in_training(tiny_train_run, tmp_path):
    out = tmp_path / "eval"
    run_script(
        "eval.py", out, f"ckpt_path={tiny_train_run}/checkpoints/last.ckpt", "data=sample", "data.num_workers=0",
        "trainer.accelerator=cpu", "extras.print_config=false", "save_images=true",
    )
    results = json.loads((out / "results.json").read_text())
    rows = read_csv_metrics(tiny_train_run)
    assert set(results) == {"sample"}
    assert results["sample"]["psnr"] == pytest.approx(last_value(rows, "val/sample/psnr"), abs=1e-6)
    assert results["sample"]["ssim"] == pytest.approx(last_value(rows, "val/sample/ssim"), abs=1e-6)
    assert results["sample"]["n"] == 2
    assert len(list((out / "images" / "sample").glob("*_x2_SR.png"))) == 2
    table = (out / "results.md").read_text()
    assert "| DLSN | x2 (BI) |" in table and f"{results['sample']['psnr']:.2f}" in table


def test_eval_refuses_checkpoint_of_another_scale(tiny_train_run, tmp_path):
    proc = run_script(
        "eval.py", tmp_path / "eval", f"ckpt_path={tiny_train_run}/checkpoints/last.ckpt", "data=sample", "scale=3",
        "logger=none", expect_success=False,
    )
    assert proc.returncode != 0 and "trained for scale 2, but scale=3" in proc.stderr
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.parametrize("scale", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_eval_bicubic_reproduces_published_numbers(benchmark_dir, tmp_path, scale):
    out = tmp_path / f"bicubic_x{scale}"
    run_script(
        "eval.py", out, "model=bicubic", f"data.benchmark_dir={benchmark_dir}", "data.test_sets=[Set5,Set14]",
        f"scale={scale}", "degradation=BI", "data.num_workers=0", "trainer.accelerator=cpu", "extras.print_config=false",
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["Set5", "Set14"]
    assert (results["Set5"]["n"], results["Set14"]["n"]) == (5, 14)
    for name, (psnr, ssim) in PUBLISHED_BICUBIC[scale].items():
        # The measured differences are at most 0.0134 dB / 0.00074 (tests/test_bicubic_baseline.py).
        assert results[name]["psnr"] == pytest.approx(psnr, abs=0.02), name
        assert results[name]["ssim"] == pytest.approx(ssim, abs=0.001), name
    assert "| Bicubic | x" in (out / "results.md").read_text()


@pytest.mark.slow
def test_ema_weights_follow_the_ema_formula_and_are_validated_saved_tested_and_evaluated(tmp_path):
    decay = 0.5
    run_dir = tmp_path / "ema"
    run_script("train.py", run_dir, *TINY_TRAIN, "callbacks=ema", f"callbacks.ema.decay={decay}", "trainer.max_epochs=2",
               "test=true", *probe_overrides(tmp_path / "probe"))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    [record] = load_records(tmp_path / "probe")
    trained = record["after_batch"]  # the weights after each of the 2 x 3 optimizer steps
    assert len(trained) == 6
    # state_dict holds the averaged weights, current_model_state the trained ones. Lightning's
    # EMAWeightAveraging (torch.optim.swa_utils.get_ema_avg_fn) copies the weights at the first step, then
    # ema_t = decay * ema_(t-1) + (1 - decay) * w_t after every step.
    network_keys = [key for key in last["state_dict"] if key.startswith("net.")]
    assert network_keys
    for key in network_keys:
        expected = trained[0][key].double()
        for weights in trained[1:]:
            expected = decay * expected + (1 - decay) * weights[key].double()
        torch.testing.assert_close(last["state_dict"][key].double(), expected, rtol=1e-6, atol=1e-7, msg=key)
        torch.testing.assert_close(last["current_model_state"][key], trained[-1][key], rtol=0, atol=0, msg=key)
    assert not torch.equal(last["state_dict"]["net.head.weight"], last["current_model_state"]["net.head.weight"])

    rows = read_csv_metrics(run_dir)
    validated = [float(r["val/sample/psnr"]) for r in rows if r.get("val/sample/psnr")]
    assert len(validated) == 2
    # test=true tests best.ckpt's weights: the averaged weights of the best validation.
    assert last_value(rows, "test/sample/psnr") == pytest.approx(max(validated), abs=1e-6)
    # Validation scored the averaged weights: eval.py on last.ckpt reproduces the last validation.
    out = tmp_path / "eval"
    run_script("eval.py", out, f"ckpt_path={run_dir}/checkpoints/last.ckpt", "data=sample", "data.num_workers=0",
               "trainer.accelerator=cpu", "logger=none", "extras.print_config=false")
    results = json.loads((out / "results.json").read_text())
    assert results["sample"]["psnr"] == pytest.approx(validated[-1], abs=1e-6)


@pytest.fixture(scope="module")
def official_eval_inputs(tmp_path_factory):
    """The official tiny DLSN's state_dict as the authors' trainer saves it, and a small image folder."""
    root = tmp_path_factory.mktemp("official_eval")
    torch.save(official_tiny_fixture()["state_dict"], root / "model_x2.pt")
    folder = write_smooth_images(root / "images", [(40, 48), (36, 30), (28, 44)])
    return root / "model_x2.pt", folder


def direct_scores(folder, network_forward):
    """Mean PSNR/SSIM of ``network_forward`` on the folder's images, as eval.py's data module serves them."""
    [batches] = evaluation_batches([str(folder)], scale=2)
    with torch.no_grad():
        return mean_psnr_ssim([(network_forward(batch["lr"]), batch) for batch in batches], scale=2)


@requires_official_fixtures()
def test_eval_of_an_official_state_dict(official_eval_inputs, tmp_path):
    """eval.py on the authors' file scores exactly what the recorded-weight network computes.

    tests/test_model_official.py shows that this network (loaded directly) reproduces the published
    code's recorded outputs; here eval.py must give the PSNR/SSIM of that very network.
    """
    weights, folder = official_eval_inputs
    out = tmp_path / "eval"
    run_script("eval.py", out, f"ckpt_path={weights}", *OFFICIAL_TINY_MODEL, f"data.test_sets=[{folder}]",
               "data.num_workers=0", "trainer.accelerator=cpu", "logger=none", "extras.print_config=false")
    results = json.loads((out / "results.json").read_text())
    net = official_tiny_network()
    net.set_rotation_seed(0)  # inference.rotation_seed: eval.py's default
    psnr, ssim = direct_scores(folder, net)
    [result] = results.values()
    assert result["n"] == 3
    assert result["psnr"] == pytest.approx(psnr, abs=1e-6)
    assert result["ssim"] == pytest.approx(ssim, abs=1e-6)
    assert "| DLSN | x2 (BI) |" in (out / "results.md").read_text()


@requires_official_fixtures()
def test_eval_refuses_an_official_state_dict_of_another_configuration(official_eval_inputs, tmp_path):
    weights, _ = official_eval_inputs
    proc = run_script("eval.py", tmp_path / "bad", f"ckpt_path={weights}", "model=dlsn_small", "data=sample",
                      "logger=none", expect_success=False)
    assert proc.returncode != 0 and "does not fit the configured network" in proc.stderr
    assert "model_x2.pt" in proc.stderr


@pytest.mark.slow
@requires_official_fixtures()
def test_self_ensemble_through_eval_is_the_mean_of_the_eight_views(official_eval_inputs, tmp_path):
    weights, folder = official_eval_inputs
    out = tmp_path / "eval"
    run_script("eval.py", out, f"ckpt_path={weights}", *OFFICIAL_TINY_MODEL, "inference=self_ensemble",
               f"data.test_sets=[{folder}]", "data.num_workers=0", "trainer.accelerator=cpu", "logger=none",
               "extras.print_config=false")
    [result] = json.loads((out / "results.json").read_text()).values()
    net = official_tiny_network()
    net.set_rotation_seed(0)

    def ensemble(lr):
        return sum(dihedral_inverse(net(dihedral(lr, index)), index) for index in range(8)) / 8

    ensemble_psnr, ensemble_ssim = direct_scores(folder, ensemble)
    plain_psnr, _ = direct_scores(folder, net)
    # The eight views are summed in another order here: allow float32 rounding (far below the gap to plain).
    assert result["psnr"] == pytest.approx(ensemble_psnr, abs=1e-4)
    assert result["ssim"] == pytest.approx(ensemble_ssim, abs=1e-6)
    assert abs(ensemble_psnr - plain_psnr) > 0.01, (ensemble_psnr, plain_psnr)
    assert "| DLSN+ | x2 (BI) |" in (out / "results.md").read_text()
