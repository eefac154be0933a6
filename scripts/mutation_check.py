#!/usr/bin/env python
"""Break the code on purpose, one named way at a time, and check that the tests notice.

Each mutation below is a behaviour-level break at a place where parts join (eval.py and the weights it
loads, SRModule and DDP, the W&B logger config, metrics and the published numbers, ...), written as
text patches. For each one the script copies the repository (tracked and untracked, not ignored files)
to a temporary directory, applies the patches there, and runs only the tests that must catch it; a
mutation is *caught* when those tests fail. Nothing in the checkout is modified.

    python scripts/mutation_check.py                 # every mutation; exit status 0 only if all are caught
    python scripts/mutation_check.py --list          # names, what each breaks, its tests
    python scripts/mutation_check.py --only wandb-id-null eval-ignores-official-weights

Before the mutations, the union of the selected tests runs on an unmodified copy and must pass without
skips (otherwise a "caught" would mean nothing; e.g. ../shared must be there: DLSN_TEST_SHARED).
A patch whose text is no longer found is reported as STALE (and fails the check): after a refactor,
move the mutation to where the behaviour now lives. Runs in `pytest -m long` (and `pytest -m slow`)
(tests/test_mutation_check.py); see the README's testing section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTEST_TIMEOUT_S = 1800  # per pytest run; the tests' own subprocesses have shorter timeouts


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` (which must occur exactly once) by ``new`` in the file ``path`` (relative to the repo)."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    breaks: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]
    issue_row: bool = False  # one of the breaks listed in issue 14's table


TRAIN_EVAL = "tests/test_train_eval.py"
RUN_OUTPUTS = "tests/test_run_outputs.py"
SCALING = "tests/test_scaling_integration.py"
TRAINING_JOINS = "tests/test_training_joins.py"
BICUBIC_ROWS = "tests/test_bicubic_baseline.py::test_bicubic_baseline_matches_published"


def _crop_mutation(extra: int) -> Mutation:
    return Mutation(
        f"metric-crop-plus-{extra}",
        f"Y-PSNR/SSIM crop scale + {extra} border pixels instead of scale",
        (Patch("dlsn/metrics.py", "    cb = crop_border\n", f"    cb = crop_border + {extra}\n"),),
        (BICUBIC_ROWS,),
        issue_row=True,
    )


MUTATIONS: tuple[Mutation, ...] = (
    # ---- the rows of issue 14's table ----------------------------------------------------------------
    Mutation(
        "eval-ignores-official-weights",
        "eval.py evaluates a freshly initialised network instead of the authors' weights it was given",
        (Patch("eval.py", '    load_into(net, weights.state_dict, source=f"ckpt_path={path}")\n',
               '    if weights.format != "official":\n'
               '        load_into(net, weights.state_dict, source=f"ckpt_path={path}")\n'),),
        (f"{TRAIN_EVAL}::test_eval_of_an_official_state_dict",),
        issue_row=True,
    ),
    Mutation(
        "pretrained-authors-file-scrambled",
        "reading the authors' files (init_from, eval.py, dlsn-sr) scrambles every parameter except head.*",
        (Patch("dlsn/models/official.py",
               "    return config, _converted(structure, state_dict)\n",
               "    converted = _converted(structure, state_dict)\n"
               "    return config, {k: v if k.startswith('head.') else v.flatten().flip(0).view_as(v)\n"
               "                    for k, v in converted.items()}\n"),),
        ("tests/test_checkpoint.py::test_pretrained_authors_file_reproduces_their_output",
         f"{TRAINING_JOINS}::test_fine_tuning_the_authors_x2_file_at_x4_starts_from_its_weights"),
        issue_row=True,
    ),
    Mutation(
        "validation-metrics-unsynced",
        "SRModule's metrics compute each process's own PSNR/SSIM (no sync across DDP processes)",
        (Patch("dlsn/lightning_module.py",
               "= PSNR_Y(crop_border=self.scale, rgb_range=self.rgb_range)",
               "= PSNR_Y(crop_border=self.scale, rgb_range=self.rgb_range, sync_on_compute=False)"),
         Patch("dlsn/lightning_module.py",
               "= SSIM_Y(crop_border=self.scale, rgb_range=self.rgb_range)",
               "= SSIM_Y(crop_border=self.scale, rgb_range=self.rgb_range, sync_on_compute=False)")),
        (f"{SCALING}::test_two_process_validation_equals_one_process",),
        issue_row=True,
    ),
    Mutation(
        "wandb-group-null",
        "logger/wandb.yaml: group null, so sweep jobs are not grouped",
        (Patch("configs/logger/wandb.yaml", "  group: ${dlsn_sweep_group:}\n", "  group: null\n"),),
        (f"{SCALING}::test_grid_multirun_trains_every_combination",),
        issue_row=True,
    ),
    Mutation(
        "wandb-id-null",
        "logger/wandb.yaml: id null, so a restarted run starts a new W&B run",
        (Patch("configs/logger/wandb.yaml", "  id: ${dlsn_run_id:${paths.output_dir}}\n", "  id: null\n"),),
        (f"{RUN_OUTPUTS}::test_wandb_run_is_identified_by_its_run_directory",
         f"{SCALING}::test_rerun_in_same_directory_resumes_from_last_checkpoint_and_its_wandb_run"),
        issue_row=True,
    ),
    Mutation(
        "wandb-runs-not-finished",
        "train.py no longer finishes the W&B run at the end of a job: sweep jobs log into the first job's run",
        (Patch("train.py", "        finish_experiment_runs()  # the next job of a sweep starts its own W&B run\n",
               "        pass\n"),),
        (f"{SCALING}::test_grid_multirun_trains_every_combination",),
        issue_row=True,
    ),
    Mutation(
        "grid-sweep-of-one-value",
        "the grid sweep test sweeps model.n_hashes=1,1 (its assertions must notice the values)",
        (Patch(SCALING, '"model.n_hashes=1,2", wandb_mode="offline"', '"model.n_hashes=1,1", wandb_mode="offline"'),),
        (f"{SCALING}::test_grid_multirun_trains_every_combination",),
        issue_row=True,
    ),
    _crop_mutation(1),
    _crop_mutation(2),
    _crop_mutation(6),
    Mutation(
        "luma-from-levels-over-256",
        "luma computed from 8-bit levels / 256 instead of / 255",
        (Patch("dlsn/metrics.py", "    y = rgb_to_y(levels, rgb_range=255.0)\n", "    y = rgb_to_y(levels, rgb_range=256.0)\n"),),
        (BICUBIC_ROWS,),
        issue_row=True,
    ),
    Mutation(
        "gla-round-logits-scaled",
        "GLA mixes its hash rounds with the softmax of 0.9 x the log-sum-exp confidences",
        (Patch("dlsn/models/gla.py", "round_weights = torch.softmax(confidences, dim=1)",
               "round_weights = torch.softmax(0.9 * confidences, dim=1)"),),
        ("tests/test_model_official.py::test_tiny_dlsn_matches_published",),
        issue_row=True,
    ),
    # ---- other joins ---------------------------------------------------------------------------------
    Mutation(
        "eval-ignores-checkpoint-weights",
        "eval.py evaluates a freshly initialised network instead of the Lightning checkpoint's weights",
        (Patch("eval.py", '    load_into(net, weights.state_dict, source=f"ckpt_path={path}")\n',
               '    if weights.format != "lightning":\n'
               '        load_into(net, weights.state_dict, source=f"ckpt_path={path}")\n'),),
        (f"{TRAIN_EVAL}::test_eval_reproduces_the_metric_logged_in_training",),
    ),
    Mutation(
        "validation-rotation-seed-ignored",
        "validation draws fresh GLA rotations instead of module.rotation_seed's",
        (Patch("dlsn/lightning_module.py",
               "    def on_validation_epoch_start(self) -> None:\n        _set_rotation_seed(self.net, self.rotation_seed)\n",
               "    def on_validation_epoch_start(self) -> None:\n        _set_rotation_seed(self.net, None)\n"),),
        (f"{TRAIN_EVAL}::test_eval_reproduces_the_metric_logged_in_training",
         "tests/test_module.py::test_validation_logs_per_set_mean_and_best_with_fixed_rotations"),
    ),
    Mutation(
        "metric-crop-ignored",
        "SRModule's metrics crop no border (crop_border=0 instead of the scale)",
        (Patch("dlsn/lightning_module.py", "PSNR_Y(crop_border=self.scale,", "PSNR_Y(crop_border=0,"),
         Patch("dlsn/lightning_module.py", "SSIM_Y(crop_border=self.scale,", "SSIM_Y(crop_border=0,")),
        (f"{TRAIN_EVAL}::test_eval_bicubic_reproduces_published_numbers[2]",
         "tests/test_module.py::test_validation_logs_per_set_mean_and_best_with_fixed_rotations"),
    ),
    Mutation(
        "resume-restores-no-rng",
        "a resumed run does not restore the RNG streams saved in the checkpoint",
        (Patch("dlsn/lightning_module.py", '        rng = getattr(self, "_pending_rng_state", None)\n',
               "        rng = None\n"),),
        (f"{TRAIN_EVAL}::test_resume_is_exact",),
    ),
    Mutation(
        "dn-eval-noise-unseeded",
        "DN validation/test noise is drawn afresh instead of from the per-image seed",
        (Patch("dlsn/data/datasets.py",
               '    return np.random.default_rng([int(seed), zlib.crc32(f"{set_name}/{name}".encode())])\n',
               "    return np.random.default_rng()\n"),),
        ("tests/test_datasets.py::test_eval_dataset_full_images_and_deterministic_dn",),
    ),
    Mutation(
        "grad-clip-by-value",
        "trainer.gradient_clip_val clips each gradient element instead of the gradient norm",
        (Patch("configs/trainer/default.yaml", "gradient_clip_algorithm: norm\n", "gradient_clip_algorithm: value\n"),),
        (f"{TRAINING_JOINS}::test_grad_clip_reaches_the_trainer",),
    ),
    Mutation(
        "ddp-skip-not-agreed",
        "each DDP process decides alone whether to skip a bad batch",
        (Patch("dlsn/lightning_module.py",
               '        skip = self.trainer.strategy.reduce(self.skip_rule.decide(loss).float(), reduce_op="max") > 0\n',
               "        skip = self.skip_rule.decide(loss)\n"),),
        (f"{SCALING}::test_all_processes_skip_a_batch_that_is_bad_on_one_of_them",),
    ),
    Mutation(
        "self-ensemble-dropped",
        "inference.self_ensemble does not reach super_resolve (eval.py reports '+' rows of plain inference)",
        (Patch("dlsn/lightning_module.py", "        self.inference = dict(inference or {})\n",
               '        self.inference = {k: v for k, v in dict(inference or {}).items() if k != "self_ensemble"}\n'),),
        (f"{TRAIN_EVAL}::test_self_ensemble_through_eval_is_the_mean_of_the_eight_views",),
    ),
    Mutation(
        "ema-starts-late",
        "callbacks=ema starts averaging at the third step instead of the first",
        (Patch("configs/callbacks/ema.yaml", "  update_starting_at_step: null\n", "  update_starting_at_step: 2\n"),),
        (f"{TRAIN_EVAL}::test_ema_weights_follow_the_ema_formula_and_are_validated_saved_tested_and_evaluated",),
    ),
    Mutation(
        "test-stage-skipped",
        "train.py test=true runs no test",
        (Patch("train.py", "            trainer.test(module, datamodule=datamodule)\n", "            pass\n"),),
        (f"{RUN_OUTPUTS}::test_test_true_tests_the_best_checkpoint",),
    ),
    Mutation(
        "compare-bicubic-swapped",
        "compare_bicubic prints the bicubic PSNR as the model's and vice versa",
        (Patch("dlsn/callbacks.py", '"model_psnr": model_psnr, "bicubic_psnr": float(bicubic_psnr),',
               '"model_psnr": float(bicubic_psnr), "bicubic_psnr": model_psnr,'),),
        (f"{RUN_OUTPUTS}::test_compare_bicubic_prints_the_model_and_bicubic_psnr",),
    ),
    Mutation(
        "init-from-not-loaded",
        "train.py ignores init_from (fine-tuning starts from scratch)",
        (Patch("train.py", '        if cfg.get("init_from") and resume_from is None:\n', "        if False:\n"),),
        (f"{TRAINING_JOINS}::test_fine_tuning_an_x2_checkpoint_at_x3_starts_from_its_weights",),
    ),
    Mutation(
        "hyperparameters-not-logged",
        "train.py does not log the resolved config and parameter count to the loggers",
        (Patch("train.py", "        log_hyperparameters(loggers, cfg, net)\n", "        pass\n"),),
        (f"{RUN_OUTPUTS}::test_wandb_records_the_resolved_config_and_parameter_count",),
    ),
    Mutation(
        "panel-sr-hr-swapped",
        "the W&B image panel shows LR | HR | SR instead of LR | SR | HR",
        (Patch("dlsn/callbacks.py", "torch.cat([lr_crop, sr[..., rows, cols].clamp(0, rgb_range), hr[..., rows, cols]], dim=-1)",
               "torch.cat([lr_crop, hr[..., rows, cols], sr[..., rows, cols].clamp(0, rgb_range)], dim=-1)"),),
        (f"{RUN_OUTPUTS}::test_wandb_image_panel_shows_lr_sr_hr_crops_of_the_validation_images",),
    ),
    Mutation(
        "results-table-psnr-ssim-swapped",
        "eval.py's W&B results table has PSNR and SSIM in each other's columns",
        (Patch("eval.py", 'n, r["psnr"], r["ssim"], r["n"]]', 'n, r["ssim"], r["psnr"], r["n"]]'),),
        (f"{RUN_OUTPUTS}::test_eval_logs_its_results_table_to_wandb",),
    ),
    # ---- the timed choices and the kernels they pick (dlsn/models/timed_choice.py) --------------------
    Mutation(
        "timed-backward-choice-ignored",
        "the fused backward times every mode, then runs the configured default instead of the fastest",
        (Patch("dlsn/models/chunk_attention.py",
               '    atomic, values_kernel = mode.startswith("atomic"), mode.endswith("+values")\n',
               '    atomic, values_kernel = _backward_mode(values.device) == "atomic", False\n'),),
        ("tests/test_timed_choice.py::test_timed_backward_runs_the_fastest_variant_and_is_exact",),
    ),
    Mutation(
        "embeddings-weight-gradient-choice-ignored",
        "GLA's embeddings' backward (relu_convolution_groups) always takes cuDNN's weight gradient, whatever was chosen",
        (Patch("dlsn/models/float32_ops.py", "grad_x, grad_weight, grad_bias = conv_weight_grad.convolution_backward(",
               "grad_x, grad_weight, grad_bias = conv_weight_grad._cudnn("),),
        ("tests/test_conv_weight_grad.py::test_gla_embeddings_backward_takes_the_chosen_weight_gradient",),
    ),
    Mutation(
        "weight-gradient-disagreement-timed",
        "a Triton weight-gradient configuration whose result differs from cuDNN's is still timed (and may be kept)",
        (Patch("dlsn/models/conv_weight_grad.py", "if not difference <= AGREEMENT:  # also NaN",
               "if False:"),),
        ("tests/test_conv_weight_grad.py::test_the_timed_choice_keeps_the_faster_and_leaves_out_a_kernel_that_disagrees",),
    ),
    Mutation(
        "self-check-skips-timed-variants",
        "the fused kernel's self-check covers only the default backward, though timing may pick another",
        (Patch("dlsn/models/chunk_attention.py", 'checked = (backward_variants(device, dtype, combinations) if configured == "timed"',
               'checked = ({"two_kernels": ("two_kernels", {})} if configured == "timed"'),),
        ("tests/test_timed_choice.py::test_self_check_runs_every_backward_variant_a_timed_choice_may_pick",),
    ),
    Mutation(
        "timed-key-configuration-ignored",
        "the timed backward picks a key-kernel launch configuration but launches LAUNCH_CONFIGS' instead",
        (Patch("dlsn/models/chunk_attention.py", 'config=configs.get("keys"), ATOMIC_GRAD_Q=atomic,',
               "ATOMIC_GRAD_Q=atomic,"),),
        ("tests/test_timed_choice.py::test_timed_backward_runs_the_fastest_variant_and_is_exact",),
    ),
    Mutation(
        "timed-values-configuration-ignored",
        "the timed backward picks a values-kernel configuration but launches LAUNCH_CONFIGS' rows and channels",
        (Patch("dlsn/models/chunk_attention.py",
               "channel_block=min(values_channels, _power_of_two(v_dim)), config=values_launch,",
               "channel_block=min(VALUES_CHANNEL_BLOCK[generation], _power_of_two(v_dim)),"),),
        ("tests/test_timed_choice.py::test_timed_values_and_query_configurations_run_as_chosen_and_are_exact",),
    ),
    Mutation(
        "delta-drops-log-sum-exp-gradient",
        "the float32 backward's delta kernel forgets the confidences' (log-sum-exp) gradient",
        (Patch("dlsn/models/chunk_attention.py",
               "tl.store(DELTA + rows, total - tl.load(GRAD_CONFIDENCE + rows, mask=row_valid, other=0.0), mask=row_valid)",
               "tl.store(DELTA + rows, total, mask=row_valid)"),),
        ("tests/test_chunk_attention.py::test_the_float32_backwards_delta_is_each_rows_dot_product_less_the_log_sum_exps_gradient",
         "tests/test_chunk_attention.py::test_fused_op_matches_reference_in_float32[two_kernels-padding, 3 chunks-cpu]"),
    ),
    Mutation(
        "timed-query-configuration-ignored",
        "the timed backward picks a query-kernel configuration but launches LAUNCH_CONFIGS' instead",
        (Patch("dlsn/models/chunk_attention.py", 'channel_block=dp_channel_block, config=configs.get("queries"), ',
               "channel_block=dp_channel_block, "),),
        ("tests/test_timed_choice.py::test_timed_values_and_query_configurations_run_as_chosen_and_are_exact",),
    ),
    Mutation(
        "dp-loop-one-channel-block",
        "with dV from the values kernel, the query and key kernels' dP sums only the first block of value channels",
        (Patch("dlsn/models/chunk_attention.py", "for channel_start in range(0, v_dim, BLOCK_C):",
               "for channel_start in range(0, BLOCK_C, BLOCK_C):"),),
        ("tests/test_chunk_attention.py::test_values_kernel_modes_split_the_value_channels_into_blocks",),
    ),
    Mutation(
        "stored-ds-mirrored-neighbour",
        "in the stored_dS backward the key kernel reads the dS the query kernel stored for the mirrored neighbour chunk",
        (Patch("dlsn/models/chunk_attention.py",
               "_grad_scores_tile(GRAD_SCORES, item_round, n_chunks, query_chunk, offset,\n",
               "_grad_scores_tile(GRAD_SCORES, item_round, n_chunks, query_chunk, 2 - offset,\n"),),
        ("tests/test_chunk_attention.py::test_fused_op_matches_reference_in_float32[stored_dS-padding, 3 chunks-cpu]",),
    ),
    Mutation(
        "matmul-values-mirrored-neighbour",
        "in the stored_dS+matmul backward the query kernel stores each key's weights under the mirrored neighbour "
        "chunk's columns of the batched dV product",
        (Patch("dlsn/models/chunk_attention.py",
               "_window_tile(KEY_WEIGHTS, item_round, n_chunks, key_chunk, 2 - offset, chunk,",
               "_window_tile(KEY_WEIGHTS, item_round, n_chunks, key_chunk, offset, chunk,"),),
        ("tests/test_chunk_attention.py::test_fused_op_matches_reference_in_float32[stored_dS+matmul-padding, 3 chunks-cpu]",),
    ),
    Mutation(
        "matmul-values-windows-unshifted",
        "the batched dV product's windows of incoming-gradient rows start one chunk late (chunk c instead of c - 1)",
        (Patch("dlsn/models/chunk_attention.py",
               "chunk_at = (torch.arange(self.chunk_positions, device=order.device) - 1) % (self.padded // chunk)",
               "chunk_at = torch.arange(self.chunk_positions, device=order.device) % (self.padded // chunk)"),),
        ("tests/test_chunk_attention.py::test_fused_op_matches_reference_in_float32[stored_dS+matmul-padding, 3 chunks-cpu]",),
    ),
    Mutation(
        "matmul-dP-rows-of-the-previous-chunk",
        "the batched dP product takes each query chunk's incoming-gradient rows from the chunk before it",
        (Patch("dlsn/models/chunk_attention.py",
               "return rows.as_strided((count, self.chunk, width), (self.chunk * width, width, 1), self.chunk * width)",
               "return rows.as_strided((count, self.chunk, width), (self.chunk * width, width, 1))"),),
        ("tests/test_chunk_attention.py::test_fused_op_matches_reference_in_float32[stored_dS+matmul+dP-padding, 3 chunks-cpu]",),
    ),
    Mutation(
        "matmul-values-duplicate-not-folded",
        "the sum of the batched dV over the rounds misses the padded duplicate of the first padded position",
        (Patch("dlsn/models/chunk_attention.py",
               "duplicated = position_valid & (sorted_index >= length - padding)",
               "duplicated = position_valid & (sorted_index > length - padding)"),),
        ("tests/test_chunk_attention.py::test_sorted_rows_summed_over_rounds_are_each_positions_rows_and_padded_"
         "duplicates[padding, partial position block-cpu]",
         "tests/test_chunk_attention.py::test_fused_op_matches_reference_in_float32[stored_dS+matmul-padding, 3 chunks-cpu]"),
    ),
    Mutation(
        "forward-weights-mirrored-window",
        "the weights+matmul forward's kernel stores each query's weights under the mirrored neighbour chunk's "
        "columns of the batched P V product",
        (Patch("dlsn/models/chunk_attention.py",
               "tl.store(_window_tile(WEIGHTS, item_round, n_chunks, query_chunk, offset, chunk,",
               "tl.store(_window_tile(WEIGHTS, item_round, n_chunks, query_chunk, 2 - offset, chunk,"),),
        ("tests/test_chunk_attention.py::test_the_weights_and_matmul_forward_matches_the_reference[padding, 3 chunks-"
         "dtype0]",),
    ),
    Mutation(
        "forward-image-rows-of-unpadded-rounds",
        "the weights+matmul forward gathers its results back to image order as if each round's product had P rows, "
        "not its n + 2 chunk positions",
        (Patch("dlsn/models/chunk_attention.py",
               "self.item_round * self.chunk_positions * self.chunk)[:, None]",
               "self.item_round * self.padded)[:, None]"),),
        ("tests/test_chunk_attention.py::test_the_weights_and_matmul_forward_matches_the_reference[padding, 3 chunks-"
         "dtype0]",),
    ),
    Mutation(
        "forward-timed-in-bf16",
        "the forward's timed choice also times bfloat16 values, whose training steps were not meant to change",
        (Patch("dlsn/models/chunk_attention.py", "TIMED_FORWARD_DTYPES = (torch.float32,)",
               "TIMED_FORWARD_DTYPES = (torch.float32, torch.bfloat16)"),),
        ("tests/test_timed_choice.py::test_timed_forward_keeps_the_faster_way_for_float32_values_only",),
    ),
    Mutation(
        "first-use-self-check-strict",
        "a process's first use of the fused kernel on a GPU runs the strict self-check: one failing optional way gives "
        "up the whole fused path",
        (Patch("dlsn/models/chunk_attention.py", "self_check(values.device, values.dtype, strict=False)",
               "self_check(values.device, values.dtype)"),),
        ("tests/test_chunk_attention.py::test_first_use_on_a_gpu_runs_the_self_check_leniently",),
    ),
    Mutation(
        "left-out-variants-still-offered",
        "a backward variant that failed the self-check is still offered to the timed choice",
        (Patch("dlsn/models/chunk_attention.py",
               'if ("backward", name) not in _left_out and ("backward mode", mode) not in _left_out}',
               "}"),),
        ("tests/test_chunk_attention.py::test_a_way_besides_the_defaults_that_fails_is_left_out_not_the_kernel",),
    ),
    Mutation(
        "attend-and-mix-delta-unweighted",
        "attention and mixing in one node: the row term forgets the round weight, g . m instead of w_t (g . m)",
        (Patch("dlsn/models/chunk_attention.py", "return (round_weights * row_dot.unsqueeze(1)).contiguous()",
               "return row_dot.unsqueeze(1).expand_as(round_weights).contiguous()"),),
        ("tests/test_chunk_attention.py::test_attend_and_mix_equals_the_separate_nodes_and_falls_back_to_the_reference",
         "tests/test_chunk_attention.py::test_attention_and_mixing_in_one_node_keep_no_attended_values_for_backward"),
    ),
    Mutation(
        "round-weighted-values-unscaled",
        "the values kernel reading the mixed gradient forgets the round weight: dV = P^T g instead of P^T (w g)",
        (Patch("dlsn/models/chunk_attention.py",
               "weights = weights * tl.load(ROUND_WEIGHTS + image_row, mask=has_output, other=0.0)[:, None]",
               "weights = weights * 1.0"),),
        ("tests/test_chunk_attention.py::test_round_weighted_backward_reads_the_mixed_gradient_as_the_materialised_one",),
    ),
    Mutation(
        "split-kernel-truncates",
        "the split convolution's kernel truncates x to TF32 instead of rounding it to nearest",
        (Patch("dlsn/models/float32_ops.py", "value.to(tl.int32, bitcast=True) + 0x1000) & -0x2000",
               "value.to(tl.int32, bitcast=True) + 0x0) & -0x2000"),),
        ("tests/test_model.py::test_the_split_kernel_gives_the_formulas_halves_bitwise",),
    ),
    Mutation(
        "embedding-groups-unmasked",
        "the embeddings' one backward convolution takes their gradients without the ReLU's mask",
        (Patch("dlsn/models/float32_ops.py",
               "torch.ops.aten.threshold_backward.grad_input(grad_group, output, 0, grad_input=into)",
               "into.copy_(grad_group)"),),
        ("tests/test_model.py::test_relu_convolution_groups_equal_separate_convolutions",
         "tests/test_model.py::test_gla_training_runs_one_backward_convolution_for_its_embeddings"),
    ),
)


# ------------------------------------------------------------------------------------------- machinery


def repository_files(root: Path) -> list[str]:
    """Files to copy: tracked and untracked-but-not-ignored ones (no venvs, logs, caches)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                 check=True, capture_output=True, text=True).stdout
        return [name for name in listing.split("\0") if name and (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".ci-venv", "logs", ".cache", "__pycache__", ".pytest_cache", "wandb", "data"}
        return [str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(root).parts[:-1])]


def copy_repository(destination: Path, files: list[str]) -> Path:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    return destination


def apply(mutation: Mutation, root: Path) -> list[str]:
    """Apply the patches in ``root``; returns the problems (stale patches), applying nothing if any."""
    texts, problems = {}, []
    for patch in mutation.patches:
        path = root / patch.path
        text = texts.get(patch.path) or (path.read_text() if path.is_file() else "")
        found = text.count(patch.old)
        if found != 1:
            problems.append(f"{patch.path}: expected the patched text once, found it {found} times: {patch.old.strip()!r}")
            continue
        texts[patch.path] = text.replace(patch.old, patch.new)
    if not problems:
        for relative, text in texts.items():
            (root / relative).write_text(text)
    return problems


@dataclass
class TestRun:
    returncode: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    tail: str = ""
    first_failure: str = ""  # "<test>: <message>" of the first failed test


def shared_dir() -> Path:
    return Path(os.environ.get("DLSN_TEST_SHARED", REPO_ROOT.parent / "shared")).resolve()


def run_tests(root: Path, tests: list[str], report: Path, stop_at_first_failure: bool) -> TestRun:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    env.update({
        "PYTHONPATH": str(root),  # the mutated copy, not an editable install of the checkout
        "PYTHONDONTWRITEBYTECODE": "1",
        "DLSN_TEST_SHARED": str(shared_dir()),
        "WANDB_MODE": "disabled",
        "DLSN_CACHE_DIR": str(root / ".cache" / "dlsn"),
    })
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
               f"--junitxml={report}", *(["-x"] if stop_at_first_failure else []), *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as timeout:
        returncode, output = -1, f"pytest timed out after {PYTEST_TIMEOUT_S} s\n{timeout.stdout or ''}"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    first_failure = ""
    if report.is_file():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in counts}
        for case in suite.iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                message = " ".join((problem.get("message") or "").split())
                first_failure = f"{case.get('name')}: {message[:160]}"
                break
    return TestRun(returncode, time.perf_counter() - start, counts, "\n".join(output.strip().splitlines()[-15:]),
                   first_failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not run the tests on an unmodified copy first (quicker, for iterating on one mutation; "
                             "a 'caught' then does not prove that the tests fail because of the mutation)")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(names)}")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for mutation in selected:
            print(f"{mutation.name}{'  [issue 14]' if mutation.issue_row else ''}\n    breaks: {mutation.breaks}")
            for test in mutation.tests:
                print(f"    caught by: {test}")
        return 0

    files = repository_files(REPO_ROOT)
    work = Path(tempfile.mkdtemp(prefix="dlsn-mutations-"))
    print(f"mutation check: {len(selected)} mutations, copies of {REPO_ROOT} in {work}", flush=True)
    started = time.perf_counter()
    try:
        # 1. The selected tests must pass, unskipped, on an unmodified copy.
        union = list(dict.fromkeys(test for mutation in selected for test in mutation.tests))
        if not args.skip_baseline:
            baseline = run_tests(copy_repository(work / "baseline", files), union, work / "baseline.xml", False)
            print(f"baseline: {baseline.counts['tests']} tests, {baseline.counts['failures'] + baseline.counts['errors']} "
                  f"failed, {baseline.counts['skipped']} skipped ({baseline.seconds:.0f} s)", flush=True)
            if baseline.returncode != 0 or baseline.counts["skipped"] or not baseline.counts["tests"]:
                print("baseline FAILED: the selected tests must pass without skips before mutations mean anything\n"
                      + baseline.tail)
                return 2
            shutil.rmtree(work / "baseline", ignore_errors=True)

        # 2. Each mutation in its own copy; caught = its tests fail.
        results = []
        for mutation in selected:
            root = copy_repository(work / mutation.name, files)
            problems = apply(mutation, root)
            if problems:
                verdict, seconds, detail = "STALE", 0.0, "; ".join(problems)
            else:
                outcome = run_tests(root, list(mutation.tests), work / f"{mutation.name}.xml", True)
                seconds = outcome.seconds
                failed = outcome.counts["failures"] + outcome.counts["errors"]
                if outcome.returncode == 1 and failed:
                    verdict, detail = "caught", f"{failed} of {outcome.counts['tests']} failed; {outcome.first_failure}"
                elif outcome.returncode == 0:
                    verdict = "MISSED"
                    detail = f"{outcome.counts['tests']} tests passed, {outcome.counts['skipped']} skipped"
                else:
                    verdict, detail = "ERROR", f"pytest exit status {outcome.returncode}: {outcome.tail[-500:]}"
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
            results.append((mutation, verdict, seconds, detail))
            print(f"{verdict:7s} {mutation.name:34s} {seconds:5.0f} s  {detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    caught = sum(verdict == "caught" for _, verdict, _, _ in results)
    print(f"\n{caught} of {len(results)} mutations caught in {time.perf_counter() - started:.0f} s")
    for mutation, verdict, _, detail in results:
        if verdict != "caught":
            print(f"  {verdict}: {mutation.name} ({mutation.breaks}): {detail}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
