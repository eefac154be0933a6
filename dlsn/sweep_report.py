"""Sweep summaries: every job of a Hydra multirun (grid or Optuna) in one table and one plot.

For a sweep directory (``logs/<task>/multiruns/<time>/``) :func:`write_summary` writes

* ``sweep_summary.csv`` and ``sweep_summary.md``: per job its overrides, status (finished / failed /
  interrupted / running, with the reason), training steps, wall time, and the validation with the
  best mean PSNR (the one ``best.ckpt`` holds): its step, mean PSNR and PSNR/SSIM per validation set;
* ``sweep_psnr.png``: mean validation PSNR against training steps, one line per job.

Everything is read from what a run leaves in its own directory, whatever the experiment logger
(W&B, TensorBoard, CSV or none): ``.hydra/overrides.yaml``; the text log ``<task>.log``, with the
validation lines of :class:`dlsn.callbacks.TrainingLog` (``validation at step 6 (epoch 1): Set5
30.12 dB / 0.9012 | mean 30.12 dB | best 30.12 dB``) and the start/end lines written by
:class:`SweepReportCallback`; the CSV logger's ``metrics.csv`` when present (full precision);
the run lock (a live job holds it); ``checkpoints/last.ckpt`` for the step count when nothing else
gives it. So a partial or interrupted sweep can be summarised too: ``scripts/sweep_report.py DIR``.

:class:`SweepReportCallback` (a Hydra callback, ``configs/hydra/default.yaml``) writes the start/end
lines into each job's log (a failure's reason and traceback included, and for an Optuna trial the
reason as the trial's ``fail_reason``), refreshes the summary after every job of a multirun, and
writes it once more when the multirun ends.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import io
import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MARKDOWN = "sweep_summary.md"
SUMMARY_PLOT = "sweep_psnr.png"

FINISHED, FAILED, INTERRUPTED, RUNNING = "finished", "failed", "interrupted", "running"

# Lines that SweepReportCallback writes into each job's log, and read_job reads back.
START_MARKER = "job started"
FINISH_MARKER = "job finished"
FAIL_MARKER = "job failed"
# train.py's last line after fit (no test): a finished run in a log without SweepReportCallback's lines.
TRAIN_END_PREFIX = "best checkpoint: "
# train.py when a signal stopped the run: "stopped by SIGTERM: saved .../last.ckpt" (dlsn.callbacks.RunStopped).
STOP_LINE = re.compile(r"^stopped by (SIG[A-Z0-9]+)")

# Hydra's job log format: [2026-01-02 10:11:12,345][dlsn.callbacks][INFO] - message
LOG_LINE = re.compile(r"^\[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[[A-Z]+\] - (?P<message>.*)$")
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
# dlsn.callbacks.TrainingLog
VALIDATION_LINE = re.compile(
    r"validation at step (?P<step>\d+) \(epoch \d+\): (?P<sets>.*) \| mean (?P<mean>\S+) dB \| best \S+ dB"
)
SET_SCORE = re.compile(r"^(?P<name>.+) (?P<psnr>\S+) dB / (?P<ssim>\S+)$")
TRAIN_STEP_LINE = re.compile(r"^step (?P<step>\d+)/(?P<total>\S+) \| epoch ")


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Validation:
    """One validation of a job: after ``step`` optimizer steps, mean PSNR over the sets and ``{set: (psnr, ssim)}``."""

    step: int
    psnr: float
    sets: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class JobReport:
    """What a sweep job's directory says about it (see :func:`read_job`)."""

    directory: Path
    number: int | None
    overrides: list[str]
    status: str
    reason: str = ""
    steps: int | None = None
    total_steps: int | None = None
    wall_time_s: float | None = None
    validations: list[Validation] = field(default_factory=list)

    @property
    def best(self) -> Validation | None:
        """The validation with the highest finite mean PSNR (the earliest among equals), ``None`` if none."""
        finite = [v for v in self.validations if math.isfinite(v.psnr)]
        return max(finite, key=lambda v: (v.psnr, -v.step)) if finite else None


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception:  # a job killed while Hydra wrote it, or a hand-edited file
        return None


def _job_number(job_dir: Path) -> int | None:
    hydra_cfg = _read_yaml(job_dir / ".hydra" / "hydra.yaml")
    number = OmegaConf.select(hydra_cfg, "hydra.job.num", default=None, throw_on_resolution_failure=False) \
        if hydra_cfg is not None else None
    if isinstance(number, int):
        return number
    return int(job_dir.name) if job_dir.name.isdigit() else None


def _log_file(job_dir: Path) -> Path | None:
    """The job's text log: ``<task_name>.log`` (configs/hydra/default.yaml), else its only ``*.log``."""
    config = _read_yaml(job_dir / ".hydra" / "config.yaml")
    task_name = OmegaConf.select(config, "task_name", default=None, throw_on_resolution_failure=False) \
        if config is not None else None
    if task_name and (job_dir / f"{task_name}.log").is_file():
        return job_dir / f"{task_name}.log"
    logs = sorted(job_dir.glob("*.log"))
    return logs[0] if len(logs) == 1 else None


def _lock_is_held(job_dir: Path) -> bool:
    """Whether a live process holds the job's run lock (``.lock``, dlsn.utils.launcher.RunDirectoryLock)."""
    lock = job_dir / ".lock"
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without flock: cannot tell
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@dataclass
class _LogFacts:
    outcome: str | None = None  # FINISHED / FAILED / INTERRUPTED from the last segment's end line
    reason: str = ""
    validations: dict[int, Validation] = field(default_factory=dict)
    steps: int | None = None
    total_steps: int | None = None
    wall_time_s: float | None = None


def _parse_sets(text: str) -> dict[str, tuple[float, float]]:
    sets = {}
    for part in text.split(", "):
        match = SET_SCORE.match(part.strip())
        if match:
            sets[match["name"]] = (_float(match["psnr"]), _float(match["ssim"]))
    return sets


def _read_log(path: Path) -> _LogFacts:
    """Outcome, validations, steps and wall time from a job's text log.

    A log holds one segment per start of the job (a requeued or resumed job appends to it): the wall
    time is the sum of the segments' spans, the outcome is the last segment's end line (none: the
    process ended without one, e.g. killed).
    """
    facts = _LogFacts()
    segment_start: datetime.datetime | None = None
    segment_end: datetime.datetime | None = None
    total_seconds = 0.0

    def close_segment() -> None:
        nonlocal total_seconds
        if segment_start is not None and segment_end is not None:
            total_seconds += (segment_end - segment_start).total_seconds()

    with open(path, errors="replace") as handle:
        for line in handle:
            match = LOG_LINE.match(line.rstrip("\n"))
            if match is None:
                continue  # a traceback or other continuation line
            message = match["message"]
            try:
                time = datetime.datetime.strptime(match["time"], LOG_TIME_FORMAT)
            except ValueError:
                time = None
            if message.startswith(START_MARKER):
                close_segment()
                segment_start, segment_end = time, time
                facts.outcome, facts.reason = None, ""
                continue
            if time is not None:
                segment_start = segment_start or time
                segment_end = time
            if message.startswith(FINISH_MARKER) or message.startswith(TRAIN_END_PREFIX):
                facts.outcome, facts.reason = FINISHED, ""
            elif message.startswith(FAIL_MARKER):
                facts.outcome, facts.reason = FAILED, message[len(FAIL_MARKER):].lstrip(": ")
            elif STOP_LINE.match(message):
                facts.outcome, facts.reason = INTERRUPTED, message
            elif validation := VALIDATION_LINE.search(message):
                step = int(validation["step"])
                facts.validations[step] = Validation(step, _float(validation["mean"]), _parse_sets(validation["sets"]))
                facts.steps = max(facts.steps or 0, step)
            elif progress := TRAIN_STEP_LINE.match(message):
                facts.steps = max(facts.steps or 0, int(progress["step"]))
                if progress["total"].isdigit():
                    facts.total_steps = int(progress["total"])
    close_segment()
    facts.wall_time_s = total_seconds if segment_start is not None else None
    return facts


def _read_csv_metrics(job_dir: Path) -> tuple[dict[int, Validation], int | None]:
    """Validations and the last step from the CSV logger's ``metrics.csv`` files (one per run start).

    Lightning logs a validation at the index of the batch just trained (one less than the optimizer
    steps done, which TrainingLog prints and checkpoints store), so 1 is added to align the two.
    """
    validations: dict[int, Validation] = {}
    last_step = None
    files = sorted((p for p in job_dir.rglob("metrics.csv") if ".submitit" not in p.parts),
                   key=lambda p: (p.parent.name.split("_")[-1].zfill(6), str(p)))
    for path in files:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if not row.get("step"):
                    continue
                step = int(float(row["step"])) + 1
                last_step = max(last_step or 0, step)
                if row.get("val/psnr") in (None, ""):
                    continue
                sets = {}
                for key, value in row.items():
                    parts = key.split("/") if key else []
                    if len(parts) == 3 and parts[0] == "val" and parts[2] == "psnr" and value:
                        sets[parts[1]] = (_float(value), _float(row.get(f"val/{parts[1]}/ssim")))
                validations[step] = Validation(step, _float(row["val/psnr"]), sets)
    return validations, last_step


def _checkpoint_step(job_dir: Path) -> int | None:
    """``global_step`` of the job's newest checkpoint (the step count when no log or metrics give it)."""
    checkpoints = sorted((job_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        return None
    from dlsn.checkpoint import CheckpointError, read_checkpoint  # only here: imports torch

    try:  # weights only (nothing from the file runs); mmap: tensors are mapped, not read
        return int(read_checkpoint(checkpoints[-1], mmap=True)["global_step"])
    except (CheckpointError, KeyError, TypeError, ValueError):  # unreadable, or not a Lightning checkpoint
        return None


def read_job(job_dir: str | Path) -> JobReport:
    """Everything :func:`write_summary` shows about one job directory (see the module docstring)."""
    job_dir = Path(job_dir)
    overrides_cfg = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides_cfg] if overrides_cfg is not None else []
    log_path = _log_file(job_dir)
    facts = _read_log(log_path) if log_path is not None else _LogFacts()

    csv_validations, csv_last_step = _read_csv_metrics(job_dir)
    validations = csv_validations or facts.validations  # CSV values have full precision
    steps = max((s for s in (facts.steps, csv_last_step) if s is not None), default=None)
    if steps is None:
        steps = _checkpoint_step(job_dir)

    if _lock_is_held(job_dir):
        status, reason = RUNNING, ""
    elif facts.outcome is not None:
        status, reason = facts.outcome, facts.reason
    else:
        status = INTERRUPTED
        reason = ("no log yet" if log_path is None else
                  "the log ends without a finish, failure or stop line (killed, or the sweep was stopped)")
    return JobReport(directory=job_dir, number=_job_number(job_dir), overrides=overrides, status=status,
                     reason=reason, steps=steps, total_steps=facts.total_steps, wall_time_s=facts.wall_time_s,
                     validations=[validations[step] for step in sorted(validations)])


def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job directories under a sweep directory: those holding ``.hydra/overrides.yaml``."""
    sweep_dir = Path(sweep_dir)
    found = []
    for overrides in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = overrides.parent.parent
        relative = job_dir.relative_to(sweep_dir).parts
        if not any(part.startswith(".") for part in relative):  # skip .submitit/ and the like
            found.append(job_dir)
    return found


def summarize_sweep(sweep_dir: str | Path) -> list[JobReport]:
    """A :class:`JobReport` per job of the sweep, in job-number order."""
    jobs = [read_job(job_dir) for job_dir in find_job_dirs(sweep_dir)]
    return sorted(jobs, key=lambda job: (job.number is None, job.number or 0, str(job.directory)))


# ----------------------------------------------------------------------------------------------- writing


def split_overrides(jobs: Sequence[JobReport]) -> tuple[list[str], list[list[str]]]:
    """The overrides every job shares, and per job the rest (for one job: all of them, none shared)."""
    if len(jobs) < 2:
        return [], [list(job.overrides) for job in jobs]
    shared = [o for o in jobs[0].overrides if all(o in job.overrides for job in jobs[1:])]
    return shared, [[o for o in job.overrides if o not in shared] for job in jobs]


def _set_names(jobs: Iterable[JobReport]) -> list[str]:
    """Every validation set name of the sweep, in order of first appearance."""
    names: dict[str, None] = {}
    for job in jobs:
        for validation in job.validations:
            names.update(dict.fromkeys(validation.sets))
    return list(names)


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None or not math.isfinite(value) else round(value, digits)


def _job_label(job: JobReport) -> str:
    return str(job.number) if job.number is not None else job.directory.name


def summary_rows(jobs: Sequence[JobReport], sweep_dir: Path) -> list[dict[str, Any]]:
    """One flat dict per job, the columns of ``sweep_summary.csv``."""
    _, own_overrides = split_overrides(jobs)
    set_names = _set_names(jobs)
    rows = []
    for job, overrides in zip(jobs, own_overrides):
        best = job.best
        row: dict[str, Any] = {
            "job": _job_label(job),
            "status": job.status,
            "steps": "" if job.steps is None else job.steps,
            "total_steps": "" if job.total_steps is None else job.total_steps,
            "wall_time_s": _round(job.wall_time_s, 1),
            "validations": len(job.validations),
            "best_step": best.step if best else "",
            "val_psnr": _round(best.psnr if best else None, 4),
        }
        for name in set_names:
            psnr, ssim = best.sets.get(name, (None, None)) if best else (None, None)
            row[f"{name}_psnr"] = _round(psnr, 4)
            row[f"{name}_ssim"] = _round(ssim, 4)
        row["overrides"] = " ".join(overrides)
        row["reason"] = job.reason
        try:
            row["directory"] = str(job.directory.relative_to(sweep_dir))
        except ValueError:
            row["directory"] = str(job.directory)
        rows.append(row)
    return rows


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(jobs: Sequence[JobReport], sweep_dir: Path) -> str:
    """The markdown page: counts, the best job, shared overrides, the table, reasons, the plot."""
    shared, own_overrides = split_overrides(jobs)
    set_names = _set_names(jobs)
    counts = {status: sum(job.status == status for job in jobs) for status in (FINISHED, FAILED, INTERRUPTED, RUNNING)}
    lines = [f"# Sweep summary: {sweep_dir.name}", "",
             f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + "."]
    scored = [job for job in jobs if job.best is not None]
    if scored:
        top = max(scored, key=lambda job: job.best.psnr)
        lines.append(f"Best: job {_job_label(top)}, {top.best.psnr:.2f} dB mean validation PSNR at step {top.best.step}"
                     + (f" ({' '.join(own_overrides[jobs.index(top)])})" if own_overrides[jobs.index(top)] else "") + ".")
    if shared:
        lines.append("Overrides of every job: " + " ".join(f"`{o}`" for o in shared))
    lines.append("")
    header = ["job", "status", "steps", "wall time", "best step", "PSNR (mean)"]
    header += [f"{name} PSNR / SSIM" for name in set_names] + ["overrides"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job, overrides in zip(jobs, own_overrides):
        best = job.best
        steps = "" if job.steps is None else str(job.steps)
        if job.total_steps is not None:
            steps = f"{steps or 0}/{job.total_steps}"
        cells = [_job_label(job), job.status, steps, _duration(job.wall_time_s),
                 str(best.step) if best else "no validation yet" if not job.validations else "",
                 f"{best.psnr:.2f}" if best else ""]
        for name in set_names:
            psnr, ssim = best.sets.get(name, (math.nan, math.nan)) if best else (math.nan, math.nan)
            cells.append(f"{psnr:.2f} / {ssim:.4f}" if math.isfinite(psnr) else "")
        cells.append(" ".join(f"`{o}`" for o in overrides))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [job for job in jobs if job.reason]
    if notes:
        lines += ["", "Why jobs did not finish:", ""]
        lines += [f"- job {_job_label(job)} ({job.status}): {_cell(job.reason)}" for job in notes]
    lines += ["", "Best PSNR/SSIM: the validation with the highest mean PSNR (the one `best.ckpt` holds).",
              "", f"![validation PSNR against steps]({SUMMARY_PLOT})", ""]
    return "\n".join(lines)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns or ["job"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_psnr(jobs: Sequence[JobReport], path: Path, title: str) -> Path:
    """Mean validation PSNR against training steps, one line per job (the Agg renderer, no display needed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from dlsn.utils.files import atomic_write

    _, own_overrides = split_overrides(jobs)
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.subplots()
    plotted = 0
    for job, overrides in zip(jobs, own_overrides):
        points = [(v.step, v.psnr) for v in job.validations if math.isfinite(v.psnr)]
        if not points:
            continue
        label = f"{_job_label(job)}: {' '.join(overrides)}" if overrides else _job_label(job)
        label = label if len(label) <= 70 else label[:67] + "..."
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o", markersize=3, label=f"{label} ({job.status})")
        plotted += 1
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("training step")
    axes.set_ylabel("validation PSNR, mean over sets (dB)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if plotted:
        axes.legend(fontsize="small", loc="best")
    else:
        axes.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=axes.transAxes)
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110), mode="wb")


def write_summary(sweep_dir: str | Path, jobs: Sequence[JobReport] | None = None,
                  plot: bool = True) -> dict[str, Path]:
    """Write the CSV, markdown and PNG summaries into ``sweep_dir``; returns their paths by kind.

    Each file is replaced atomically, so jobs finishing at the same time (parallel launchers) and
    readers never see a half-written summary. Without matplotlib the plot is left out (warning).
    """
    from dlsn.utils.files import atomic_write_text

    sweep_dir = Path(sweep_dir)
    jobs = summarize_sweep(sweep_dir) if jobs is None else list(jobs)
    written = {
        "csv": atomic_write_text(sweep_dir / SUMMARY_CSV, _csv_text(summary_rows(jobs, sweep_dir))),
        "markdown": atomic_write_text(sweep_dir / SUMMARY_MARKDOWN, summary_markdown(jobs, sweep_dir)),
    }
    if plot:
        try:
            written["plot"] = plot_psnr(jobs, sweep_dir / SUMMARY_PLOT, f"{sweep_dir.name}: validation PSNR")
        except ImportError as err:
            log.warning("no sweep plot: %s (pip install matplotlib)", err)
    return written


# -------------------------------------------------------------------------------------- Hydra callback


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # Hydra is optional for reading a sweep directory
    _HydraCallback = object  # type: ignore[assignment,misc]


def _log_traceback_to_files(error: BaseException) -> None:
    """The traceback into the job's log file only (the console already gets Hydra's or the sweeper's report)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback of the failure:", (),
                            (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _is_rank_zero_process() -> bool:
    """Only rank 0 writes the lines: the other DDP processes (torchrun, Lightning's re-launched script,
    SLURM tasks) run the same Hydra job with the same log file."""
    from dlsn.utils.launcher import is_rank_zero_process

    return is_rank_zero_process()


class SweepReportCallback(_HydraCallback):
    """Hydra callback: job start/end lines in each job's log, and the sweep summary of a multirun.

    * ``on_job_start``: ``job started: <overrides>``.
    * ``on_job_end``: ``job finished (returned <value>)``, or ``job failed: <Error>: <message>``
      followed by the traceback (in the log file only). For an Optuna trial with a persistent
      storage the reason is also stored with the trial (user attribute ``fail_reason``,
      :func:`dlsn.sweep.record_trial_failure`). In a multirun the summary is then refreshed
      (``after_each_job``), so it is current while the sweep runs and after it is killed.
    * ``on_multirun_end``: the summary once more, and its path on the console.

    Only global rank 0 of a DDP job writes (the other processes share its log file). A job stopped
    by a signal (train.py exits with 128 + signal) ends without ``on_job_end``; its ``stopped by
    SIG...`` line marks it. Summary errors are logged as warnings, never raised: a report must not
    fail a training job.
    """

    def __init__(self, after_each_job: bool = True, plot: bool = True) -> None:
        self.after_each_job = bool(after_each_job)
        self.plot = bool(plot)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_rank_zero_process():
            return
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
        log.info("%s: %s", START_MARKER, " ".join(str(o) for o in overrides) or "no overrides")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if not _is_rank_zero_process():
            return
        if job_return.status == JobStatus.COMPLETED:
            value = job_return._return_value
            log.info("%s", FINISH_MARKER if value is None else f"{FINISH_MARKER} (returned {value})")
        elif job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            reason = f"{type(error).__name__}: {error}"
            log.error("%s: %s", FAIL_MARKER, " ".join(reason.split())[:1000])
            if isinstance(error, BaseException):
                _log_traceback_to_files(error)
            try:
                from dlsn.sweep import record_trial_failure

                trial = record_trial_failure(reason, config.hydra)
                if trial is not None:
                    log.info("reason stored with Optuna trial %d (user attribute fail_reason)", trial)
            except Exception as err:  # the storage may be unreachable from this node
                log.warning("could not store the failure reason with the Optuna trial: %s", err)
        if self.after_each_job and self._is_multirun(config):
            self._write(config, announce=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config, announce=True)

    @staticmethod
    def _is_multirun(config: DictConfig) -> bool:
        from hydra.types import RunMode

        mode = OmegaConf.select(config, "hydra.mode", default=None)
        return mode == RunMode.MULTIRUN or str(mode).upper().endswith("MULTIRUN")

    def _write(self, config: DictConfig, announce: bool) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_dir():  # e.g. every job was refused before any directory was made
                return
            written = write_summary(sweep_dir, plot=self.plot)
            if announce:
                log.info("sweep summary: %s (table: %s)", written["markdown"], written["csv"].name)
        except Exception as err:
            log.warning("could not write the sweep summary: %s", err, exc_info=True)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sweep_report.py",
        description="Summarise a Hydra sweep directory (grid or Optuna, finished, partial or interrupted): "
                    f"writes {SUMMARY_CSV}, {SUMMARY_MARKDOWN} and {SUMMARY_PLOT} into it and prints the table.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. logs/train/multiruns/<time>")
    parser.add_argument("--no-plot", action="store_true", help=f"do not draw {SUMMARY_PLOT}")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    jobs = summarize_sweep(args.sweep_dir)
    if not jobs:
        print(f"error: no job directories (with .hydra/overrides.yaml) under {args.sweep_dir}", file=sys.stderr)
        return 2
    written = write_summary(args.sweep_dir, jobs, plot=not args.no_plot)
    print(summary_markdown(jobs, args.sweep_dir))
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
