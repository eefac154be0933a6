"""`scripts/benchmark_precision.py` end to end on CPU: a tiny DLSN, a few steps, both parts, JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers.runs import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_precision.py"
TINY = ["--device", "cpu", "--model", "small", "--batch", "2", "--patch", "16", "--warmup", "1", "--steps", "2",
        "--train-steps", "4", "--precisions", "32-true", "bf16-mixed"]


def run_benchmark(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # One thread: this checks the pipeline, not speed, and on a 2-core machine two OpenMP threads that
    # share a core with any other process slow down by orders of magnitude.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow  # four train.py runs, 42 s (the default suite had passed 15 minutes on a slow CPU)
def test_tiny_run_reports_throughput_memory_and_psnr_per_precision(tmp_path):
    json_path = tmp_path / "precision.json"
    proc = run_benchmark(*TINY, "--json", str(json_path), "--run-dir", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(json_path.read_text())

    throughput, accuracy = report["throughput"], report["accuracy"]
    assert list(throughput) == list(accuracy) == ["32-true", "bf16-mixed"]
    for numbers in throughput.values():
        assert finite_positive(numbers["iterations_per_s"]) and finite_positive(numbers["peak_memory_mib"])
        assert numbers["patches_per_s"] == pytest.approx(2 * numbers["iterations_per_s"])
    expected_ratio = throughput["bf16-mixed"]["iterations_per_s"] / throughput["32-true"]["iterations_per_s"]
    assert throughput["bf16-mixed"]["speedup_vs_32_true"] == pytest.approx(expected_ratio)
    assert throughput["32-true"]["speedup_vs_32_true"] == pytest.approx(1.0)
    assert report["memory_kind"] == "process_peak_rss_cumulative"

    for numbers in accuracy.values():
        assert math.isfinite(numbers["val_psnr"]), numbers
        assert (Path(numbers["run_dir"]) / "csv").is_dir()
    delta = accuracy["bf16-mixed"]["val_psnr"] - accuracy["32-true"]["val_psnr"]
    assert accuracy["bf16-mixed"]["psnr_delta_vs_32_true_db"] == pytest.approx(delta)

    targets = report["targets"]
    assert targets["throughput"]["speedup"] == pytest.approx(expected_ratio)
    assert targets["throughput"]["pass"] == (expected_ratio >= 1.8)
    assert targets["accuracy"]["pass"] == (abs(delta) <= 0.05)
    assert set(report["tf32"]) == {"cudnn.allow_tf32", "cuda.matmul.allow_tf32", "float32_matmul_precision"}
    # The printed report: both tables and the two verdict lines.
    assert "| precision | median step (ms) | it/s |" in proc.stdout
    assert "| run | val PSNR (dB) |" in proc.stdout
    assert sum(line.startswith(("- **PASS**", "- **FAIL**")) for line in proc.stdout.splitlines()) == 2


@pytest.mark.slow  # train.py runs, 33 s
def test_accuracy_only_runs_train_py_at_once_and_reports_in_run_order(tmp_path):
    """gpu_check.sh's way: no throughput part, the three train.py runs started together."""
    json_path = tmp_path / "precision.json"
    runs = tmp_path / "runs"
    proc = run_benchmark(*TINY, "--skip-throughput", "--parallel-runs", "--noise-run", "--json", str(json_path),
                         "--run-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(json_path.read_text())
    assert report["throughput"] == {} and "| precision | median step (ms) |" not in proc.stdout
    accuracy = report["accuracy"]
    assert list(accuracy) == ["32-true", "bf16-mixed", "32-true seed 43"]
    assert [numbers["seed"] for numbers in accuracy.values()] == [42, 42, 43]
    for label, numbers in accuracy.items():
        assert math.isfinite(numbers["val_psnr"]) and Path(numbers["run_dir"]) == runs / label.replace(" ", "_")
        assert numbers["psnr_delta_vs_32_true_db"] == pytest.approx(numbers["val_psnr"] - accuracy["32-true"]["val_psnr"])
    # Started together: every run was under way before the first one finished.
    starts = [line for line in proc.stdout.splitlines() if line.startswith("[accuracy]") and line.endswith("...")]
    first_end = next(i for i, line in enumerate(proc.stdout.splitlines()) if "val PSNR" in line and "[accuracy]" in line)
    assert len(starts) == 3 and all(proc.stdout.splitlines().index(line) < first_end for line in starts)
    assert "- **not measured** throughput (--skip-throughput)" in proc.stdout


def test_sigterm_stops_the_train_py_runs_too(tmp_path):
    """gpu_check.sh stops a step at its time limit with SIGTERM; the train.py runs (in sessions of their own)
    must stop with it, not go on sharing the GPU with the next measurement."""
    import signal
    import time

    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "--skip-throughput", "--parallel-runs",
                             "--train-steps", "100000", "--run-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def train_py_processes() -> list[str]:
        listed = subprocess.run(["pgrep", "-f", f"train.py hydra.run.dir='{runs}"], capture_output=True, text=True)
        return listed.stdout.split()

    deadline = time.monotonic() + 120
    while len(train_py_processes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(train_py_processes()) == 2, "the two train.py runs did not start"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    # SIGKILL takes effect when the kernel next schedules them: wait for that, however busy the machine.
    deadline = time.monotonic() + 60
    while train_py_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert train_py_processes() == [], output[-2000:]


@pytest.mark.parametrize("handler_thread", ["another", "the run's"])
def test_a_run_that_starts_while_sigterm_is_handled_is_stopped_too(tmp_path, monkeypatch, handler_thread):
    """SIGTERM's handler stops the train.py processes it knows of. One started just then (Popen returned,
    not yet registered) must stop too: with --parallel-runs the handler runs in the main thread while a
    worker thread starts its run; without, the handler may run in the run's own thread as it registers."""
    import signal
    import threading

    script = load_script("benchmark_precision")
    args = script.parse_args(["--device", "cpu", "--train-timeout", "30"])
    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def sigterm_now():
        try:
            script.stop_training_runs(signal.SIGTERM, None)
        except SystemExit:
            pass

    def popen_then_sigterm(command, **kwargs):  # a process that would run past the timeout, then the signal
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs))
        if handler_thread == "another":
            handler = threading.Thread(target=sigterm_now)
            handler.start()
            handler.join()
        return started[-1]

    class RegisterUnderSigterm(set):
        def add(self, process):
            script.stop_training_runs(signal.SIGTERM, None)  # raises SystemExit before it registers

    monkeypatch.setattr(script.subprocess, "Popen", popen_then_sigterm)
    if handler_thread == "another":
        result = script.run_training(args, "32-true", 0, tmp_path / "run")
        # Killed at once: without the stop it would have run into --train-timeout ("timed out").
        assert result["error"].startswith("train.py exited with -9"), result["error"]
    else:
        monkeypatch.setattr(script, "_running", RegisterUnderSigterm())
        with pytest.raises(SystemExit):
            script.run_training(args, "32-true", 0, tmp_path / "run")
        assert started[0].wait(timeout=60) == -signal.SIGKILL


def test_seeds_pair_each_precision_with_float32_of_the_same_seed_and_judge_the_mean(tmp_path):
    """--seeds 2: bf16 of seed s against 32-true of seed s (same initial weights and batches), the target on
    the mean of those differences; 32-true of the second seed against the first, float32's own spread. The
    summary of gpu_check.sh shows the same."""
    script = load_script("benchmark_precision")
    args = script.parse_args(["--device", "cpu", "--seeds", "2", "--seed", "7"])
    runs = script.accuracy_runs(args)
    assert runs == [("32-true", "32-true", 7), ("bf16-mixed", "bf16-mixed", 7),
                    ("32-true seed 8", "32-true", 8), ("bf16-mixed seed 8", "bf16-mixed", 8)]
    psnr = {"32-true": 30.00, "bf16-mixed": 29.90, "32-true seed 8": 30.20, "bf16-mixed seed 8": 30.24}
    accuracy = {label: {"precision": precision, "seed": seed, "val_psnr": psnr[label]} for label, precision, seed in runs}
    script.psnr_deltas(accuracy)
    assert {label: (round(n["psnr_delta_vs_32_true_db"], 6), n["delta_against"]) for label, n in accuracy.items()} == {
        "32-true": (0.0, "32-true"), "bf16-mixed": (-0.1, "32-true"),
        "32-true seed 8": (0.2, "32-true"), "bf16-mixed seed 8": (0.04, "32-true seed 8")}
    targets = script.evaluate_targets({"throughput": {}, "accuracy": accuracy})["accuracy"]
    assert targets["delta_db"] == pytest.approx(-0.03) and targets["pass"] is True  # |(-0.10 + 0.04) / 2| <= 0.05
    assert targets["paired_deltas_db"] == pytest.approx([-0.1, 0.04])

    (tmp_path / "precision.json").write_text(json.dumps({"settings": {"device": "cuda"}, "accuracy": accuracy}))
    summary = subprocess.run([sys.executable, str(SCRIPT.parent / "gpu_check_summary.py"), str(tmp_path)],
                             capture_output=True, text=True, check=True, cwd=SCRIPT.parent).stdout
    rows = [line for line in summary.splitlines() if line.startswith("| val PSNR")]
    assert rows == [
        "| val PSNR bf16-mixed vs 32-true after a short run (mean over 2 seeds: -0.1000, +0.0400) | | | -0.0300 dB | | "
        "within 0.05 dB | MET |",
        "| val PSNR 32-true seed 8 vs 32-true after a short run (float32's own spread) | | | +0.2000 dB | | | (information) |",
    ], summary
    # one seed, as before: the --noise-run float32 run only informs
    one_seed = script.accuracy_runs(script.parse_args(["--device", "cpu", "--noise-run", "--seed", "7"]))
    assert one_seed == [("32-true", "32-true", 7), ("bf16-mixed", "bf16-mixed", 7), ("32-true seed 8", "32-true", 8)]


def test_a_repeated_float32_run_measures_the_noise_and_can_make_a_difference_inconclusive(tmp_path):
    """--repeat-float32: 32-true once more with the first seed, paired with the first 32-true run (not
    replacing it as the baseline); a bf16 difference over the target that float32 matches against itself is
    INCONCLUSIVE, in the script's verdict and in gpu_check.sh's summary; one larger than that is still a FAIL."""
    script = load_script("benchmark_precision")
    runs = script.accuracy_runs(script.parse_args(["--device", "cpu", "--seeds", "2", "--seed", "7", "--repeat-float32"]))
    assert runs[-1] == ("32-true repeat", "32-true", 7) and len(runs) == 5
    for repeat_psnr, verdict, status in ((29.60, "INCONCLUSIVE", "INCONCLUSIVE (float32 differs from itself as much)"),
                                         (29.95, "FAIL", "NOT MET")):
        psnr = {"32-true": 30.00, "bf16-mixed": 30.20, "32-true seed 8": 30.10, "bf16-mixed seed 8": 30.30,
                "32-true repeat": repeat_psnr}
        accuracy = {label: {"precision": precision, "seed": seed, "val_psnr": psnr[label]}
                    for label, precision, seed in runs}
        script.psnr_deltas(accuracy)
        assert accuracy["32-true repeat"]["delta_against"] == "32-true"
        assert accuracy["bf16-mixed"]["psnr_delta_vs_32_true_db"] == pytest.approx(0.2)  # the first run stays the baseline
        report = {"throughput": {}, "accuracy": accuracy, "settings": {"skip_throughput": True, "skip_accuracy": False}}
        report["targets"] = script.evaluate_targets(report)
        assert report["targets"]["accuracy"]["repeat_delta_db"] == pytest.approx(repeat_psnr - 30.0)
        accuracy_line = script.verdict_lines(report)[1]
        assert accuracy_line.startswith(f"- **{verdict}** accuracy: bf16-mixed validation PSNR differs from 32-true by "
                                        "+0.2000 dB"), accuracy_line
        assert f"differs from itself by {repeat_psnr - 30.0:+.4f} dB" in accuracy_line

        (tmp_path / "precision.json").write_text(json.dumps({"settings": {"device": "cuda"}, "accuracy": accuracy}))
        summary = subprocess.run([sys.executable, str(SCRIPT.parent / "gpu_check_summary.py"), str(tmp_path)],
                                 capture_output=True, text=True, check=True, cwd=SCRIPT.parent).stdout
        rows = [line for line in summary.splitlines() if line.startswith("| val PSNR")]
        assert rows[0].endswith(f"| within 0.05 dB | {status} |"), rows
        assert (f"| val PSNR 32-true run again vs 32-true (same seed and settings: the measurement's noise) | | | "
                f"{repeat_psnr - 30.0:+.4f} dB | | | (information) |") in rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cpu", "--precisions", "16-mixed"], "16-mixed needs a CUDA device"),
        (["--device", "mps"], "only cpu and cuda"),
        (["--device", "cpu", "--steps", "0"], "--steps must be a positive integer"),
        (["--device", "cpu", "--skip-throughput", "--skip-accuracy"], "leave nothing to measure"),
        (["--device", "cpu", "--parallel-runs", "--cudnn-benchmark"], "run them one after another"),
        (["--device", "cpu", "--seeds", "0"], "--seeds must be a positive integer"),
        pytest.param(["--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    ],
)
def test_bad_arguments_are_refused_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmark_precision").parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_short_runs_rate_decays_to_zero_by_their_last_step_by_default(schedule):
    """The train.py runs compose the schedule --schedule names: by default a cosine from the full rate at the
    first step to 0 after the last (stepped per iteration), which ends every run at rest; or no scheduler."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    script = load_script("benchmark_precision")
    args = script.parse_args(["--device", "cpu", "--model", "small", "--train-steps", "8", "--lr", "0.01",
                              *(["--schedule", schedule] if schedule == "constant" else [])])
    assert args.schedule == schedule
    overrides = [o for o in script.train_overrides(args, "32-true", 42, Path("/tmp/unused"))
                 if not o.startswith("hydra.")]
    with initialize_config_dir(version_base="1.3", config_dir=str(script.PROJECT_ROOT / "configs")):
        cfg = compose("train", overrides=overrides)
    if schedule == "constant":
        assert cfg.module.scheduler is None
        return
    assert cfg.module.scheduler_interval == "step"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.module.optimizer.lr)
    scheduler = instantiate(cfg.module.scheduler)(optimizer)
    rates = []
    for _ in range(args.train_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.01) and rates[4] == pytest.approx(0.005)  # half way: half the rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
