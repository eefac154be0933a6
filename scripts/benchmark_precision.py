"""Float32 versus mixed precision for DLSN training: speed, peak memory and validation PSNR.

One command measures the paper configuration (DLSN x2, batch 16, 48x48 LR patches) in every
precision of ``--precisions`` and prints a markdown report with PASS/FAIL lines for the targets
(bf16-mixed at least 1.8x the 32-true iterations/s; validation PSNR after a short run within
0.05 dB of 32-true):

    python scripts/benchmark_precision.py                           # on a GPU: throughput + accuracy
    python scripts/benchmark_precision.py --strict-fp32             # the same with TF32 off for "float32"
    python scripts/benchmark_precision.py --skip-accuracy           # throughput and memory only
    python scripts/benchmark_precision.py --json $OUT/precision.json --noise-run
    python scripts/benchmark_precision.py --skip-throughput --parallel-runs --seeds 2   # accuracy only, two
                                                                    # seeds, the train.py runs at once
    python scripts/benchmark_precision.py --skip-throughput --parallel-runs --repeat-float32   # float32 run
                                                                    # twice: the measurement's noise (gpu_check.sh)
    python scripts/benchmark_precision.py --device cpu --model small --batch 2 --patch 16 \\
        --warmup 1 --steps 2 --train-steps 4                        # a CPU check of the whole pipeline

Two parts:

1. Throughput (unless ``--skip-throughput``), in this process: a fresh network per precision (same seed), fused Adam lr 1e-4, random
   LR/HR batches; ``--warmup`` steps, then ``--steps`` timed steps (forward, L1 loss, backward,
   Adam). Precisions follow Lightning's plugins: ``32-true`` no autocast, ``bf16-mixed``
   ``torch.autocast(bfloat16)``, ``16-mixed`` ``torch.autocast(float16)`` with a GradScaler.
   Peak memory: ``torch.cuda.max_memory_allocated`` per precision on CUDA; on CPU the process's
   peak RSS so far (it only grows, so later precisions include earlier ones).
2. Accuracy (unless ``--skip-accuracy``): ``train.py`` in a subprocess per precision, identical
   seed and settings, on the bundled sample images (no download), one epoch of
   ``--train-steps`` iterations ending in a validation; the PSNR is read from the run's CSV log.
   The runs stay under ``--run-dir`` (default ``logs/benchmark_precision/<time>/``). With
   ``--seeds N`` every precision trains with N seeds: each precision's PSNR is compared with 32-true's of
   the same seed (same initial weights and batches), the target judged on the mean of those differences,
   and 32-true's later seeds against its first show float32's own spread after so short a run;
   ``--repeat-float32`` trains 32-true once more with the first seed and the same settings, the
   measurement's own noise (on an H200 on 2026-11-28 two such runs ended 0.64 dB apart: the reference
   attention's backward adds with atomics, so no two float32 runs are identical, and after 200 steps at
   a constant rate any rounding difference has sent training elsewhere). A bf16 difference over the
   target that this noise matches is reported INCONCLUSIVE, not FAIL. The rate follows ``--schedule``:
   by default a cosine decay to 0 over the run (per step), so that every run ends at rest instead of
   wherever its last large steps threw it. On the CPU (small model, 200 steps, six seeds; 2026-11-28,
   docs/measurements/cpu-2026-11-28-schedule/) that cut the standard deviation of the paired bf16 -
   float32 differences from 0.90 dB (constant rate: -1.33 to +0.81 dB) to 0.048 dB (-0.044 to +0.088
   dB, mean +0.005). ``--schedule constant`` keeps the rate fixed, as before. With
   ``--parallel-runs`` they run at the same time (they share the device; their PSNR does not depend on
   it: cuDNN's autotuner, and with it GLA's timed choices, is off in these runs unless
   ``--cudnn-benchmark``, so no run's arithmetic depends on a timing).

On Ampere and later GPUs PyTorch lets cuDNN convolutions use TF32 in "float32" by default; the
report prints the TF32 flags in effect, and ``--strict-fp32`` turns TF32 off (in this process with
the ``torch.backends`` flags, in the train.py runs with ``NVIDIA_TF32_OVERRIDE=0``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dlsn.utils.config import find_project_root, register_resolvers
from dlsn.utils.files import write_json_strict
from dlsn.utils.instantiate import build_network, count_parameters

PROJECT_ROOT = find_project_root(__file__)

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
BASELINE = "32-true"
# --model name -> the configs/model/ option it stands for.
MODEL_CONFIGS = {"paper": "dlsn", "small": "dlsn_small"}
# Learning rate of the short train.py runs. For the paper network it is the paper's 1e-4, not the
# quickstart's 2e-3: that value is tuned for the 32-feature model, and the 256-feature DLSN (residual
# scaling 0.1) is trained at 1e-4 in the paper. A faster rate risks early loss spikes, which the
# module's skip rule would turn into different skipped batches per precision: a difference in
# stability, not in arithmetic. The comparison only needs both precisions to follow the same stable
# schedule, and 300 Adam steps of up to 1e-4 each can move a weight by as much as the initial
# weights of the 256-channel convolutions (about 0.02). The report's bicubic column shows how far
# training got.
SHORT_RUN_LR = {"paper": 1e-4, "small": 2e-3}
# Adam lr of the timed steps: the paper's (the rate does not change the cost of a step).
THROUGHPUT_LR = 1e-4
TARGET_SPEEDUP = 1.8
TARGET_PSNR_DELTA_DB = 0.05
# --schedule: how the short runs' rate changes (schedule_overrides).
SCHEDULES = ("constant", "cosine")
# --repeat-float32's run: 32-true again with the first seed and the same settings.
REPEAT_LABEL = f"{BASELINE} repeat"


# ------------------------------------------------------------------------------------------ set-up
def model_config(model: str, scale: int):
    """The ``model`` section train.py composes for ``model=<dlsn|dlsn_small>`` (same defaults list)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "configs")):
        cfg = compose("train", overrides=[f"model={MODEL_CONFIGS[model]}", f"scale={scale}"])
    return cfg.model


def build_network_on_meta(net_cfg):
    with torch.device("meta"):
        return build_network(net_cfg)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def tf32_settings() -> dict[str, Any]:
    return {
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["32-true", "bf16-mixed"],
                        help="Lightning precision names (default: 32-true bf16-mixed)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    parser.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="paper",
                        help="paper: configs/model/dlsn.yaml; small: configs/model/dlsn_small.yaml (quick CPU checks)")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="patches per batch (paper: 16)")
    parser.add_argument("--patch", type=int, default=48, help="LR patch side (paper: 48); HR is patch x scale")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per precision")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--strict-fp32", action="store_true",
                        help="turn TF32 off: float32 convolutions and matmuls in full float32")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN autotuning (torch.backends.cudnn.benchmark; trainer.benchmark=true in train.py); "
                             "off by default, as in configs/trainer/default.yaml")
    parser.add_argument("--skip-accuracy", action="store_true", help="throughput and memory only")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="accuracy only (the training step's speed measured elsewhere, e.g. benchmark_train_step.py)")
    parser.add_argument("--parallel-runs", action="store_true",
                        help="start the train.py runs at once instead of one after another")
    parser.add_argument("--train-steps", type=int, default=300, help="iterations of each train.py run")
    parser.add_argument("--lr", type=float, default=None,
                        help="lr of the train.py runs (default: 1e-4 for the paper model, 2e-3 for small)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                        help="lr schedule of the train.py runs: a cosine decay to 0 over the --train-steps (per "
                             "step; the default), which ends every run at rest and so lets a rounding difference "
                             "move the final PSNR far less, or constant")
    parser.add_argument("--noise-run", action="store_true",
                        help="also train 32-true with seed+1: the PSNR spread of float32 itself, "
                             "to judge the 0.05 dB target (implied by --seeds 2 or more)")
    parser.add_argument("--repeat-float32", action="store_true",
                        help="also train 32-true a second time with the first seed and the same settings: the "
                             "measurement's own noise (nondeterministic kernels, such as index_add_'s atomic "
                             "additions, send a short run elsewhere as any rounding does)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every precision with this many seeds (--seed, --seed + 1, ...): the PSNR "
                             "target is judged on the mean of the paired differences, and 32-true's runs show "
                             "its own spread")
    parser.add_argument("--train-timeout", type=float, default=240.0, help="seconds allowed per train.py run")
    parser.add_argument("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every train.py run, e.g. data.num_workers=0")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the train.py runs write (default: logs/benchmark_precision/<time>/)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    for name in ("batch", "patch", "steps", "train_steps", "scale", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.skip_throughput and args.skip_accuracy:
        parser.error("--skip-throughput and --skip-accuracy together leave nothing to measure")
    if args.parallel_runs and args.cudnn_benchmark:
        parser.error("--parallel-runs with --cudnn-benchmark: the runs' autotuners would time their candidates "
                     "while the other runs share the device, and pick by that; run them one after another")
    if args.scale not in (2, 3, 4):
        parser.error(f"--scale must be 2, 3 or 4, got {args.scale}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.train_timeout > 0:
        parser.error(f"--train-timeout must be positive, got {args.train_timeout}")
    args.precisions = list(dict.fromkeys(args.precisions))  # keep order, drop repeats
    if args.lr is None:
        args.lr = SHORT_RUN_LR[args.model]

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: only cpu and cuda[:N] are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available (torch {torch.__version__}, "
                         f"{torch.cuda.device_count()} GPUs visible); install a CUDA build of torch "
                         "or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
        if "bf16-mixed" in args.precisions and not torch.cuda.is_bf16_supported():
            parser.error(f"bf16-mixed: {torch.cuda.get_device_name(device)} does not support bfloat16 "
                         "(needs Ampere or newer); drop it from --precisions")
    elif "16-mixed" in args.precisions:
        parser.error("16-mixed needs a CUDA device (float16 autocast with a GradScaler); on a CPU Lightning turns "
                     "it into bf16-mixed, which --precisions bf16-mixed measures already")
    args.device = device
    return args


# -------------------------------------------------------------------------------------- throughput
def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_throughput(precision: str, args: argparse.Namespace, net_cfg) -> dict[str, Any]:
    """Median time of a training step as Lightning's precision plugin would run it."""
    device = args.device
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)  # the same initial weights and batches in every precision
    model = build_network(net_cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=THROUGHPUT_LR, fused=True)  # as configs/module/optimizer/adam.yaml
    hr_size = args.patch * args.scale
    lr_batch = torch.rand(args.batch, 3, args.patch, args.patch, device=device)
    hr_batch = torch.rand(args.batch, 3, hr_size, hr_size, device=device)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def train_step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        # Lightning's plugin wraps the whole training_step, loss included, in autocast.
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            loss = F.l1_loss(model(lr_batch), hr_batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach()

    for _ in range(args.warmup):
        train_step()
    synchronize(device)
    step_seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = train_step()
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    median_s = statistics.median(step_seconds)
    result = {
        "median_step_s": median_s,
        "min_step_s": min(step_seconds),
        "max_step_s": max(step_seconds),
        "iterations_per_s": 1.0 / median_s,
        "patches_per_s": args.batch / median_s,
        "peak_memory_mib": peak_memory_mib(device),
        "last_loss": float(loss),
    }
    return result


def run_throughput(args: argparse.Namespace, net_cfg, report: dict[str, Any]) -> None:
    results = report["throughput"]
    for precision in args.precisions:
        print(f"[throughput] {precision}: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
        try:
            results[precision] = measure_throughput(precision, args, net_cfg)
        except torch.cuda.OutOfMemoryError as err:
            results[precision] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        free_memory(args.device)  # outside the except block, whose traceback holds the step's tensors
        numbers = results[precision]
        if "error" in numbers:
            print(f"[throughput] {precision}: {numbers['error']}", flush=True)
        else:
            print(f"[throughput] {precision}: {numbers['median_step_s'] * 1e3:.1f} ms/step, "
                  f"{numbers['iterations_per_s']:.2f} it/s, peak {numbers['peak_memory_mib']:.0f} MiB", flush=True)
    baseline = results.get(BASELINE, {}).get("iterations_per_s")
    for numbers in results.values():
        if baseline and "iterations_per_s" in numbers:
            numbers["speedup_vs_32_true"] = numbers["iterations_per_s"] / baseline


# ---------------------------------------------------------------------------------------- accuracy
def train_overrides(args: argparse.Namespace, precision: str, seed: int, run_dir: Path) -> list[str]:
    """train.py's command line: one epoch of --train-steps iterations that ends in a validation."""
    accelerator = ["trainer.accelerator=gpu"] if args.device.type == "cuda" else ["trainer.accelerator=cpu"]
    if args.device.type == "cuda" and args.device.index is not None:
        accelerator.append(f"trainer.devices=[{args.device.index}]")
    return [
        f"hydra.run.dir='{run_dir}'",
        "experiment=quickstart",  # the bundled sample images, x2 BI
        f"model={MODEL_CONFIGS[args.model]}",
        f"scale={args.scale}",
        f"seed={seed}",
        f"data.patch_size={args.patch}",
        f"data.batch_size={args.batch}",
        f"data.iters_per_epoch={args.train_steps}",
        "trainer.max_epochs=1",
        f"trainer.max_steps={args.train_steps}",
        f"trainer.log_every_n_steps={min(10, args.train_steps)}",
        f"trainer.precision={precision}",
        f"trainer.benchmark={str(args.cudnn_benchmark).lower()}",
        *accelerator,
        f"module.optimizer.lr={args.lr}",
        *schedule_overrides(args.schedule, args.train_steps),
        "logger=csv",
        # No checkpoints (the paper model's with Adam state is large) and no progress bar in the log.
        "callbacks=none",
        "+trainer.enable_checkpointing=false",
        "+trainer.enable_progress_bar=false",
        "extras.print_config=false",
        *args.train_overrides,
    ]


def schedule_overrides(schedule: str, train_steps: int) -> list[str]:
    """train.py overrides for ``--schedule``: no scheduler (a constant rate), or ``module/scheduler=cosine``
    stepped every iteration from the full rate down to 0 at the last one."""
    if schedule == "constant":
        return ["module.scheduler=null"]
    return ["module/scheduler=cosine", "module.scheduler_interval=step", f"module.scheduler.T_max={train_steps}",
            "module.scheduler.eta_min=0"]


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        return []
    with open(files[-1], newline="") as handle:
        return list(csv.DictReader(handle))


def logged_values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key) not in (None, "")]


# train.py processes under way. Each has its own session (so that a timeout stops it with its DataLoader
# workers), so a signal to this script does not reach them: stop_training_runs passes it on.
_running: set[subprocess.Popen] = set()
# Set by stop_training_runs. A run whose process started while the handler ran (in another thread, before
# the run was in _running) sees it and stops its process itself.
_stopping = False


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def stop_training_runs(signum, frame) -> None:
    """SIGTERM handler (e.g. ``timeout`` in gpu_check.sh): stop every train.py run, then exit. Left
    running, they would share the GPU with whatever is measured next."""
    global _stopping
    _stopping = True
    for process in list(_running):
        _kill(process)
    raise SystemExit(128 + signum)


def run_training(args: argparse.Namespace, precision: str, seed: int, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = train_overrides(args, precision, seed, run_dir)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if args.strict_fp32:
        env["NVIDIA_TF32_OVERRIDE"] = "0"  # read by cuBLAS and cuDNN: no TF32 anywhere in the run
    log_path = run_dir / "stdout.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        # Its own session, so a timeout can stop train.py together with its DataLoader workers.
        process = subprocess.Popen([sys.executable, "train.py", *overrides], cwd=PROJECT_ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _running.add(process)
            if _stopping:
                _kill(process)
            returncode = process.wait(timeout=args.train_timeout)
        except subprocess.TimeoutExpired:
            _kill(process)
            process.wait()
            returncode = None
        except BaseException:  # the handler's SystemExit in this thread, Ctrl-C: the run must not outlive us
            _kill(process)
            raise
        finally:
            _running.discard(process)
    result: dict[str, Any] = {"precision": precision, "seed": seed, "run_dir": str(run_dir),
                              "wall_s": time.perf_counter() - start, "overrides": overrides}
    log_text = log_path.read_text(errors="replace")
    if returncode is None:
        result["error"] = f"timed out after {args.train_timeout:.0f} s (--train-timeout); log: {log_path}"
        return result
    if returncode != 0:
        tail = "\n".join(log_text.strip().splitlines()[-5:])
        result["error"] = f"train.py exited with {returncode}; log: {log_path}\n{tail}"
        return result

    rows = read_metrics_csv(run_dir)
    psnr = logged_values(rows, "val/psnr")
    if not psnr:
        result["error"] = f"no val/psnr in {run_dir}/csv/*/metrics.csv (did the run reach its validation?)"
        return result
    result["val_psnr"] = psnr[-1]
    for key, name in (("train/loss_epoch", "final_train_loss"), ("train/skipped_batches", "skipped_batches")):
        values = logged_values(rows, key)
        result[name] = values[-1] if values else None
    throughput = logged_values(rows, "train/throughput")
    result["train_patches_per_s"] = statistics.median(throughput) if throughput else None
    # Bicubic on the same validation images, as train.py prints it (2 decimals): how far training got.
    bicubic = re.findall(r"bicubic PSNR (\d+\.\d+) dB", log_text)
    result["bicubic_psnr"] = float(bicubic[-1]) if bicubic else None
    return result


def accuracy_runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, precision, seed) of every train.py run: each precision with each of the ``--seeds`` seeds
    (labelled by the precision alone for the first seed), with ``--noise-run`` 32-true with one more, and with
    ``--repeat-float32`` 32-true once more with the first seed (``REPEAT_LABEL``)."""
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [(precision if seed == args.seed else f"{precision} seed {seed}", precision, seed)
            for seed in seeds for precision in args.precisions]
    if args.noise_run and args.seeds == 1:
        runs.append((f"{BASELINE} seed {args.seed + 1}", BASELINE, args.seed + 1))
    if args.repeat_float32:
        runs.append((REPEAT_LABEL, BASELINE, args.seed))
    return runs


def psnr_deltas(results: dict[str, dict[str, Any]]) -> None:
    """Every finished run's PSNR difference to a 32-true run (``psnr_delta_vs_32_true_db``, and which one:
    ``delta_against``): another precision against 32-true with the same seed (same initial weights and
    batches: the precision's effect, plus how far rounding sent training elsewhere); 32-true with another
    seed against the first seed's 32-true (float32's own spread after so short a run), and the repeated 32-true
    run against the first (the same settings twice: the measurement's noise)."""
    float32_by_seed = {numbers["seed"]: (label, numbers) for label, numbers in results.items()
                       if numbers.get("precision") == BASELINE and "val_psnr" in numbers and label != REPEAT_LABEL}
    first_seed = min(float32_by_seed, default=None)
    for numbers in results.values():
        paired_seed = first_seed if numbers.get("precision") == BASELINE else numbers.get("seed")
        label, baseline = float32_by_seed.get(paired_seed, (None, {}))
        if "val_psnr" in numbers and "val_psnr" in baseline:
            numbers["psnr_delta_vs_32_true_db"] = numbers["val_psnr"] - baseline["val_psnr"]
            numbers["delta_against"] = label


def run_accuracy(args: argparse.Namespace, report: dict[str, Any], save) -> None:
    runs = accuracy_runs(args)
    results = report["accuracy"]

    def start(label: str) -> Path:
        run_dir = args.run_dir / label.replace(" ", "_")
        print(f"[accuracy] {label}: train.py, {args.train_steps} steps -> {run_dir} ...", flush=True)
        return run_dir

    def finished(label: str, numbers: dict[str, Any]) -> None:
        results[label] = numbers
        if "error" in numbers:
            print(f"[accuracy] {label}: FAILED: {numbers['error']}", flush=True)
        else:
            print(f"[accuracy] {label}: val PSNR {numbers['val_psnr']:.4f} dB ({numbers['wall_s']:.0f} s)", flush=True)
        psnr_deltas(results)
        save()

    if not args.parallel_runs:
        for label, precision, seed in runs:
            finished(label, run_training(args, precision, seed, start(label)))
        return
    # Threads only wait for their train.py processes, which do the work.
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {pool.submit(run_training, args, precision, seed, start(label)): label
                   for label, precision, seed in runs}
        for future in as_completed(futures):
            finished(futures[future], future.result())
    # In the order of the runs (as run one after another), whatever order they finished in.
    report["accuracy"] = {label: results[label] for label, _, _ in runs}
    save()


# ------------------------------------------------------------------------------------------ report
def paired_deltas(accuracy: dict[str, dict[str, Any]], precision: str) -> list[float]:
    """``precision``'s PSNR differences to 32-true with the same seed, one per seed where both finished."""
    return [numbers["psnr_delta_vs_32_true_db"] for numbers in accuracy.values()
            if numbers.get("precision") == precision and "psnr_delta_vs_32_true_db" in numbers]


def evaluate_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The targets: throughput of bf16-mixed against 32-true; bf16-mixed's PSNR difference to 32-true, the
    mean over the seeds where both runs finished (``--seeds``: each seed's difference mixes the precision's
    effect with where rounding sent so short a training; the mean averages the latter down)."""
    speedup = report["throughput"].get("bf16-mixed", {}).get("speedup_vs_32_true")
    deltas = paired_deltas(report["accuracy"], "bf16-mixed")
    delta = statistics.fmean(deltas) if deltas else None
    noise = report["accuracy"].get(REPEAT_LABEL, {}).get("psnr_delta_vs_32_true_db")
    return {
        "throughput": {"target_speedup": TARGET_SPEEDUP, "speedup": speedup,
                       "pass": None if speedup is None else speedup >= TARGET_SPEEDUP},
        "accuracy": {"target_abs_delta_db": TARGET_PSNR_DELTA_DB, "delta_db": delta, "paired_deltas_db": deltas,
                     "pass": None if delta is None else abs(delta) <= TARGET_PSNR_DELTA_DB,
                     "repeat_delta_db": noise,
                     "inconclusive": inconclusive(delta, noise)},
    }


def inconclusive(delta: float | None, noise: float | None) -> bool:
    """Whether a PSNR difference over the target says nothing: float32 run twice with the same settings
    (``--repeat-float32``) differed by at least as much."""
    return (delta is not None and noise is not None and abs(delta) > TARGET_PSNR_DELTA_DB
            and abs(noise) >= abs(delta))


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def report_header(report: dict[str, Any]) -> list[str]:
    settings, versions = report["settings"], report["versions"]
    on_cuda = settings["device"].startswith("cuda")
    tf32 = ", ".join(f"{key}={value}" for key, value in report["tf32"].items())
    if settings["strict_fp32"]:
        tf32 += " (--strict-fp32; the train.py runs have NVIDIA_TF32_OVERRIDE=0)"
    elif on_cuda:
        tf32 += " (PyTorch defaults: on Ampere and later, float32 convolutions may use TF32)"
    memory = ("torch.cuda.max_memory_allocated per precision" if on_cuda
              else "process peak RSS, cumulative over the precisions run so far (CPU)")
    lines = [
        (f"## DLSN precision benchmark: {settings['model']} model, x{settings['scale']}, "
         f"batch {settings['batch']}, {settings['patch']}x{settings['patch']} LR patches"),
        "",
        f"- date {report['date']}; device `{settings['device']}`: {report['device_name']}",
        (f"- torch {versions['torch']}, CUDA {versions['cuda']}, cuDNN {versions['cudnn']}, "
         f"{versions['cpu_threads']} CPU threads; {report['parameters'] / 1e6:.2f} M parameters"),
        f"- TF32: {tf32}; cudnn.benchmark={settings['cudnn_benchmark']}",
    ]
    if not settings["skip_throughput"]:
        lines += ["", (f"Throughput: {settings['warmup']} warm-up + {settings['steps']} timed training steps per "
                       f"precision (forward, L1, backward, Adam), median. Memory: {memory}.")]
    return lines


def throughput_table(report: dict[str, Any]) -> list[str]:
    on_cuda = report["settings"]["device"].startswith("cuda")
    memory_column = "peak GPU memory (MiB)" if on_cuda else "peak RSS so far (MiB)"
    lines = [
        f"| precision | median step (ms) | it/s | patches/s | {memory_column} | speed-up vs 32-true |",
        "|---|---|---|---|---|---|",
    ]
    for precision, numbers in report["throughput"].items():
        if "error" in numbers:
            lines.append(f"| {precision} | {numbers['error']} | | | | |")
            continue
        lines.append(
            f"| {precision} | {numbers['median_step_s'] * 1e3:.1f} | {numbers['iterations_per_s']:.3f} | "
            f"{numbers['patches_per_s']:.1f} | {numbers['peak_memory_mib']:.0f} | "
            f"{fmt(numbers.get('speedup_vs_32_true'), '.2f', 'x')} |"
        )
    return lines


def accuracy_table(report: dict[str, Any]) -> list[str]:
    settings = report["settings"]
    lines = [
        (f"Accuracy: `train.py experiment=quickstart model={MODEL_CONFIGS[settings['model']]}` on the sample "
         f"images, {settings['train_steps']} steps, {settings.get('schedule', 'constant')} lr {settings['lr']:g}, seed {settings['seed']}; "
         f"validation PSNR (Y channel, 2 images) at the end. Runs: `{settings['run_dir']}`."),
        "",
        ("| run | val PSNR (dB) | Δ vs 32-true (same seed; 32-true: first seed) (dB) | bicubic (dB) | final train loss | skipped batches "
         "| train.py patches/s | wall (s) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, numbers in report["accuracy"].items():
        if "error" in numbers:
            lines.append(f"| {label} | failed: {numbers['error'].splitlines()[0]} | | | | | | |")
            continue
        lines.append(
            f"| {label} | {numbers['val_psnr']:.4f} | {fmt(numbers.get('psnr_delta_vs_32_true_db'), '+.4f')} | "
            f"{fmt(numbers.get('bicubic_psnr'), '.2f')} | {fmt(numbers.get('final_train_loss'), '.5f')} | "
            f"{fmt(numbers.get('skipped_batches'), '.0f')} | {fmt(numbers.get('train_patches_per_s'), '.1f')} | "
            f"{numbers['wall_s']:.0f} |"
        )
    return lines


def verdict_lines(report: dict[str, Any]) -> list[str]:
    speed, accuracy = report["targets"]["throughput"], report["targets"]["accuracy"]
    needs = "needs 32-true and bf16-mixed in --precisions"
    if speed["pass"] is None:
        reason = "--skip-throughput" if report["settings"]["skip_throughput"] else needs
        speed_line = f"- **not measured** throughput ({reason})"
    else:
        speed_line = (f"- **{'PASS' if speed['pass'] else 'FAIL'}** throughput: bf16-mixed runs at "
                      f"{speed['speedup']:.2f}x the 32-true iterations/s (target >= {TARGET_SPEEDUP}x)")
    if accuracy["pass"] is None:
        reason = "--skip-accuracy" if report["settings"]["skip_accuracy"] else f"{needs}, and both runs to finish"
        accuracy_line = f"- **not measured** accuracy ({reason})"
    else:
        deltas = accuracy.get("paired_deltas_db") or []
        seeds = (f" (mean over {len(deltas)} seeds: " + ", ".join(f"{d:+.4f}" for d in deltas) + ")"
                 if len(deltas) > 1 else "")
        verdict = "PASS" if accuracy["pass"] else "INCONCLUSIVE" if accuracy.get("inconclusive") else "FAIL"
        accuracy_line = (f"- **{verdict}** accuracy: bf16-mixed validation PSNR "
                         f"differs from 32-true by {accuracy['delta_db']:+.4f} dB{seeds} "
                         f"(target |Δ| <= {TARGET_PSNR_DELTA_DB} dB)")
        if accuracy.get("repeat_delta_db") is not None:
            accuracy_line += (f"; 32-true run again with the same seed and settings differs from itself by "
                              f"{accuracy['repeat_delta_db']:+.4f} dB")
    return [speed_line, accuracy_line]


def markdown_report(report: dict[str, Any]) -> str:
    lines = report_header(report)
    if report["throughput"]:
        lines += ["", *throughput_table(report)]
    if report["accuracy"]:
        lines += ["", *accuracy_table(report)]
    lines += ["", *verdict_lines(report)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    signal.signal(signal.SIGTERM, stop_training_runs)
    if args.strict_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    started = datetime.datetime.now()
    if args.run_dir is None:
        args.run_dir = PROJECT_ROOT / "logs" / "benchmark_precision" / started.strftime("%Y-%m-%d_%H-%M-%S")
    args.run_dir = args.run_dir.resolve()

    net_cfg = model_config(args.model, args.scale)
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
        },
        "settings": {
            "device": str(device), "model": args.model, "scale": args.scale, "batch": args.batch, "patch": args.patch,
            "warmup": args.warmup, "steps": args.steps, "seed": args.seed, "precisions": args.precisions,
            "strict_fp32": args.strict_fp32, "cudnn_benchmark": args.cudnn_benchmark,
            "skip_accuracy": args.skip_accuracy, "skip_throughput": args.skip_throughput,
            "parallel_runs": args.parallel_runs, "train_steps": args.train_steps, "lr": args.lr,
            "schedule": args.schedule,
            "noise_run": args.noise_run, "repeat_float32": args.repeat_float32, "seeds": args.seeds, "train_overrides": args.train_overrides, "run_dir": str(args.run_dir),
        },
        "tf32": tf32_settings(),
        "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss_cumulative",
        # Counted on the meta device: no weights allocated, so the CPU peak RSS is not inflated.
        "parameters": count_parameters(build_network_on_meta(net_cfg)),
        "throughput": {},
        "accuracy": {},
    }

    def save() -> None:
        # After each stage, so a run stopped by a time limit still leaves what it measured.
        report["targets"] = evaluate_targets(report)
        report["elapsed_s"] = (datetime.datetime.now() - started).total_seconds()
        if args.json is not None:
            write_json_strict(args.json, report)

    print(f"{report['date']}  {report['device_name']}  torch {torch.__version__}  TF32 {report['tf32']}", flush=True)
    if not args.skip_throughput:
        run_throughput(args, net_cfg, report)
    save()
    if not args.skip_accuracy:
        run_accuracy(args, report, save)
    save()
    print()
    print(markdown_report(report))
    print(f"\n(total {report['elapsed_s']:.0f} s" + (f"; JSON: {args.json})" if args.json else ")"))
    failed = any("error" in numbers for part in ("throughput", "accuracy") for numbers in report[part].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
