"""The worked examples of docs/architecture.md, run as written: a new model, optimizer, data set and callback."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tests.helpers.runs import run_script

def test_a_new_model_optimizer_data_set_and_callback_need_only_configuration(tmp_path):
    rng = np.random.default_rng(0)
    for folder, count in (("train", 3), ("val", 2)):
        (tmp_path / folder).mkdir()
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / folder / f"{index}.png")
    learning_rates = tmp_path / "lr.txt"
    run_dir = tmp_path / "run"
    run_script(
        "train.py", run_dir,
        # the model: tests/helpers/models.py, without a YAML file
        "~model", "+model={_target_:tests.helpers.models.TinyUpsampler,scale:${scale}}",
        # the optimizer and schedule
        "module.optimizer._target_=torch.optim.SGD", "~module.optimizer.betas", "~module.optimizer.eps",
        "~module.optimizer.fused", "+module.optimizer.momentum=0.9", "module/scheduler=cosine",
        # the data set
        "data=folder", f"data.train_set={tmp_path / 'train'}", f"data.val_sets=[{tmp_path / 'val'}]",
        "data.patch_size=12", "data.batch_size=2", "data.iters_per_epoch=3", "data.num_workers=0",
        # the callback
        "+callbacks.write_lr._target_=tests.helpers.callbacks.WriteLearningRates", f"+callbacks.write_lr.path={learning_rates}",
        "trainer.max_epochs=2", "trainer.accelerator=cpu", "logger=csv", "extras.print_config=false", "compare_bicubic=false",
    )
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["dlsn_network"]["config"]["_target_"] == "tests.helpers.models.TinyUpsampler"
    assert "momentum" in checkpoint["optimizer_states"][0]["param_groups"][0]  # SGD, not Adam
    assert checkpoint["lr_schedulers"][0]["T_max"] == 2  # cosine over trainer.max_epochs
    steps = [line.split() for line in learning_rates.read_text().splitlines()]
    assert [int(step) for step, _ in steps] == list(range(1, 7))
    assert float(steps[-1][1]) < float(steps[0][1])  # the cosine schedule lowered the rate
    # eval.py rebuilds the new network from the checkpoint; a network outside dlsn.models is built when the
    # run's own model config names it (or with trust_checkpoint=true).
    run_script("eval.py", tmp_path / "eval", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "data=folder",
               "~model", "+model={_target_:tests.helpers.models.TinyUpsampler,scale:${scale}}",
               f"data.test_sets=[{tmp_path / 'val'}]", "data.train_set=null", "data.val_sets=[]", "trainer.accelerator=cpu",
               "logger=none", "extras.print_config=false", "data.num_workers=0")
    import json

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["val"]["n"] == 2 and 5 < results["val"]["psnr"] < 100
