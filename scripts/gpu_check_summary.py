"""One markdown table from the JSON files scripts/gpu_check.sh leaves in a results folder.

    python scripts/gpu_check_summary.py RESULTS_DIR

Reads ``check.json`` (scripts/check_fused_gla.py), ``train_step.json`` (scripts/benchmark_train_step.py:
the paper training step, eager and compiled, against the published code; ``compile_bf16.json`` and
``compile_32.json``: the compiled step alone from an empty torch.compile cache, for the compile warm-up;
``train_step_heuristics.json``: the eager step with cuDNN's heuristics instead of its autotuner), ``gla_targets.json`` and ``gla_targets_bf16.json``
(scripts/benchmark_gla.py --targets in float32 and under bf16 autocast; ``gla_compiled.json``: the GLA rows
compiled as train.py's training steps; ``weight_grad.json``: scripts/benchmark_weight_grad.py), ``precision.json``
(scripts/benchmark_precision.py) and ``duration.json`` (gpu_check.sh's own time to measure every target;
where it says the information steps were not asked for, their files are not reported missing), whichever
exist, and prints one table: the correctness checks,
then issue 9's model-level targets (published code, reference and fused implementation, the fused
one's ratio to the published code: the authors' own where ``benchmark_gla.py --published-src`` ran it,
else the published layout re-implemented there; the target and whether the float32 run meets it; the bf16 run
for information), then the training-step precision rows; under the table, where the float32 model-level
rows' time goes (their largest kernels, from ``benchmark_gla.py --kernel-table``).

Targets are judged (MET / NOT MET) only on numbers measured on CUDA. Numbers from the CPU (``gpu_check.sh
--rehearse``, toy sizes) show REHEARSAL: they check that every step's output reaches this table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmark_train_step import memory_text  # the producer's formatting of its two peaks

# (kind, LR size, batch) -> (target speed-up of fused over published, largest memory ratio or None)
TARGETS = {
    ("gla_forward_backward", 48, 1): (1.0, None),
    ("gla_forward_backward", 96, 1): (1.0, None),
    ("gla_forward_backward", 96, 16): (3.0, None),
    ("dlsn_forward", 128, 1): (1.0, None),
    ("dlsn_forward", 360, 1): (2.5, 0.3),
}
NAMES = {"gla_forward_backward": "GLA fwd+bwd, C=256", "dlsn_forward": "whole-image forward, paper DLSN x2"}


def judged(met: bool, device: str | None) -> str:
    if not str(device).startswith("cuda"):
        return "REHEARSAL"
    return "MET" if met else "NOT MET"


def load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def timing(case: dict | None) -> str:
    if case is None:
        return "—"
    if "error" in case:
        return f"error: {case['error'][:80]}"
    return f"{1000 * case['median_s']:.1f} ms, {case['peak_mb']:.0f} MB"


def cases_by_row(targets: dict | None) -> dict[tuple, dict[str, dict]]:
    """The recorded cases by target row ``(kind, LR size, batch)`` and implementation (--smoke runs record the
    paper case each toy case stands for)."""
    rows: dict[tuple, dict[str, dict]] = {}
    for case in (targets or {}).get("cases", []):
        row = (case["kind"], case.get("paper_size", case["size"]), case.get("paper_batch", case["batch"]))
        rows.setdefault(row, {})[case["impl"]] = case
    return rows


def judged_baseline(cases: dict[str, dict]) -> dict | None:
    """Issue 9 compares with the authors' code: judged against it where it ran, else the published layout."""
    authors = cases.get("authors")
    return authors if authors and "error" not in authors else cases.get("published")


def target_rows(targets: dict | None, file_name: str, judging: bool, project: str = "fused") -> list[str]:
    """Issue 9's model-level rows; ``judging``: with MET / NOT MET (else the ratios are for information).
    ``project``: the implementation of this project in the "fused" column (``compiled``: gla_compiled.json's
    rows, which have only the training kinds; the others are left out)."""
    if targets is None:
        return [f"| model-level targets ({file_name}) | | | | | | MISSING |"]
    rows = []
    by_row = cases_by_row(targets)
    for (kind, size, batch), (speed_target, memory_target) in TARGETS.items():
        cases = by_row.get((kind, size, batch), {})
        authors, layout, reference, fused = (cases.get(impl) for impl in ("authors", "published", "reference", project))
        if project != "fused" and fused is None:
            continue
        published = judged_baseline(cases)
        measured = [c for c in (authors, layout, reference, fused) if c]
        if not measured:
            rows.append(f"| {NAMES[kind]}, batch {batch}, LR {size}x{size} | | | | | | NOT MEASURED |")
            continue
        precision = f"{measured[0]['precision']}, matmul {measured[0].get('matmul_precision', 'highest')}"
        ratio, status = "—", "NOT MEASURED"
        if published and fused and "error" not in published and "error" not in fused:
            speed = published["median_s"] / fused["median_s"]
            memory = fused["peak_mb"] / published["peak_mb"] if published["peak_mb"] > 0 else float("nan")
            ratio = f"{speed:.2f}x time, {memory:.2f}x memory"
            met = speed >= speed_target and (memory_target is None or memory <= memory_target)
            status = judged(met, targets.get("device")) if judging else "(information)"
        shown = timing(published)
        if authors is not None and published is authors:
            shown = f"authors' code {shown}" + (f"; layout {timing(layout)}" if layout else "")
        target = f">= {speed_target:g}x" + (f", memory <= {memory_target:g}x" if memory_target else "")
        toy = ", toy sizes" if measured[0].get("smoke") else ""
        compiled = ", torch.compile as train.py's steps" if project == "compiled" else ""
        label = f"{NAMES[kind]}, batch {batch}, LR {size}x{size} ({precision}{compiled}{toy})"
        rows.append(f"| {label} | {shown} | {timing(reference)} | {timing(fused)} | {ratio} | "
                    f"{target if judging else ''} | {status} |")
    return rows


# precision -> (target speed-up of the compiled step over the published one, largest memory ratio)
STEP_TARGETS = {"bf16-mixed": (2.5, 0.5), "32-true": (2.0, 0.5)}
COMPILE_WARMUP_LIMIT_S = 180


# precision -> the file of gpu_check.sh's step that compiles the training step from an empty cache
COLD_COMPILE_FILES = {"bf16-mixed": "compile_bf16.json", "32-true": "compile_32.json"}


def compiled_from_cache(result: dict) -> bool:
    """Whether a compiled case's warm-up found its graphs in torch.compile's on-disk cache."""
    cache = result.get("compile_cache") or {}
    return cache.get("fxgraph_hit", 0) > 0 or cache.get("autograd_hit", 0) > 0


def compile_warmup_row(precision: str, cold_results: list | None, compiled: dict | None) -> str:
    """The compile warm-up target, judged on a compilation from an empty cache: gpu_check.sh's compile step
    (run beside other steps: an upper bound), or train_step's own where it found nothing cached."""
    file_name = COLD_COMPILE_FILES[precision]
    cold = next((r for r in cold_results or [] if r["case"] == "project-compiled"), None)
    if cold is None and compiled is not None and not compiled_from_cache(compiled):
        cold = compiled
    label = f"compile warm-up, {precision}"
    if cold is None:
        shown = f"{compiled['warmup_s']:.0f} s with the graphs cached (train_step)" if compiled else ""
        return f"| {label}, from an empty cache ({file_name}) | | | {shown} | | <= {COMPILE_WARMUP_LIMIT_S} s | MISSING |"
    shown = f"{cold['warmup_s']:.0f} s from an empty cache"
    if cold is not compiled:
        shown += f" ({file_name}, beside other steps)"
        if compiled is not None:
            shown += f"; {compiled['warmup_s']:.0f} s with the graphs " + (
                "cached" if compiled_from_cache(compiled) else "not found in the cache") + " (train_step)"
    return (f"| {label} | | | {shown} | | <= {COMPILE_WARMUP_LIMIT_S} s | "
            f"{judged(cold['warmup_s'] <= COMPILE_WARMUP_LIMIT_S, cold.get('device'))} |")


def train_step_rows(results: list | None, cold_compiles: dict[str, list | None] | None = None) -> list[str]:
    """Issue 9's training-step rows: this project (eager, compiled) against the published code. Memory is
    judged on the peak of the timed steps, what every step of a long run needs; the warm-up's peak (cuDNN's
    autotuner trying algorithms with their workspaces, compilation) is shown beside it where higher.
    ``cold_compiles``: per precision, the compile step's results (:func:`compile_warmup_row`)."""
    cold_compiles = cold_compiles or {}
    if results is None:
        return ["| training step (train_step.json) | | | | | | MISSING |"] + [
            compile_warmup_row(precision, cold_compiles.get(precision), None) for precision in STEP_TARGETS]
    rows = []
    for precision, (speed_target, memory_target) in STEP_TARGETS.items():
        cases = {r["case"]: r for r in results if r["precision"] == precision}
        published, eager, compiled = (cases.get(c) for c in ("published", "project", "project-compiled"))

        def shown(case):
            if case is None:
                return "—"
            memory = "" if case.get("peak_mb") is None else f", {memory_text(case)}"
            return f"{1000 * case['step_s']:.1f} ms{memory}"

        ratio, status = "—", "NOT MEASURED"
        if published and compiled:
            speed = published["step_s"] / compiled["step_s"]
            memory = compiled["peak_mb"] / published["peak_mb"]
            ratio = f"{speed:.2f}x time, {memory:.2f}x memory"
            status = judged(speed >= speed_target and memory <= memory_target, compiled.get("device"))
        rows.append(f"| training step x2, batch 16, 48x48, {precision} | {shown(published)} | {shown(eager)} (eager) | "
                    f"{shown(compiled)} (compiled) | {ratio} | >= {speed_target:g}x, memory <= {memory_target:g}x | {status} |")
        rows.append(compile_warmup_row(precision, cold_compiles.get(precision), compiled))
    return rows


def autotune_rows(autotuned: list | None, heuristics: list | None) -> list[str]:
    """The eager step with cuDNN's autotuner (train_step.json, as the paper recipes) and with its heuristics."""
    if heuristics is None:
        return ["| eager step, cuDNN heuristics (train_step_heuristics.json) | | | | | | MISSING |"]
    def shown(step: dict, how: str) -> str:
        memory = "" if step.get("peak_mb") is None else f", {memory_text(step)}"
        return f"{1000 * step['step_s']:.1f} ms{memory} ({how})"

    rows = []
    for without in heuristics:
        tuned = next((r for r in autotuned or [] if r["case"] == without["case"]
                      and r["precision"] == without["precision"] and r.get("cudnn_autotune")), None)
        gain = f"autotuner {without['step_s'] / tuned['step_s']:.2f}x faster" if tuned else "—"
        rows.append(f"| eager step, {without['precision']}: cuDNN heuristics vs autotuner | | "
                    f"{shown(without, 'heuristics')} | {shown(tuned, 'autotuned') if tuned else '—'} | {gain} | | "
                    f"(information) |")
    return rows


def timed_choice_rows(*results: list | None) -> list[str]:
    """What the timed choices (dlsn/models/timed_choice.py) picked in the training steps and the model-level
    forward+backward cases, with each candidate's time."""
    choices: dict[str, dict] = {}
    for result in (result for listed in results for result in listed or []):
        choices |= result.get("timed_choices") or {}
    return [f"| timed choice: {what} | | | {entry['choice']} | "
            + ", ".join(f"{name} {ms:.3f} ms" for name, ms in entry["ms"].items()) + " | | (information) |"
            for what, entry in choices.items()]


def kernel_lines(targets: dict | None, largest: int = 3) -> list[str]:
    """Under the table: the model-level rows' largest kernels (``benchmark_gla.py --kernel-table``), for the
    published code the row is judged against and for the fused implementation: where the time goes."""
    by_row = cases_by_row(targets)
    lines = []
    for row in TARGETS:
        kind, size, batch = row
        cases = by_row.get(row, {})
        for case in (judged_baseline(cases), cases.get("fused")):
            if case is None or "error" in case or not case.get("kernels"):
                continue
            kernels = "; ".join(f"{k['ms']:.2f} ms {k['name'][:60]}" for k in case["kernels"][:largest])
            lines.append(f"- {NAMES[kind]}, batch {batch}, LR {size}x{size}, {case['impl']}: "
                         f"{1000 * case['median_s']:.1f} ms, {case['kernel_ms']:.1f} ms in kernels: {kernels}")
    return ["", "Largest kernels per run (gla_targets.json; all of them in `gla_targets.txt`):", *lines] if lines else []


def psnr_rows(precision: dict | None) -> list[str]:
    """The PSNR target (benchmark_precision.py): per precision other than 32-true, its difference to 32-true
    trained with the same seed, the mean over the seeds (``--seeds``) judged; then 32-true with other seeds
    against its first seed, float32's own spread after so short a run, and 32-true repeated with the first seed
    (``--repeat-float32``: the same settings twice, the measurement's noise; information). A difference over
    the target that the repeat matches or exceeds is INCONCLUSIVE: the measurement cannot resolve it."""
    spread_rows, paired, noise = [], {}, None
    for name, numbers in (precision or {}).get("accuracy", {}).items():
        if "psnr_delta_vs_32_true_db" not in numbers or numbers.get("delta_against", "32-true") == name:
            continue  # unfinished, or the baseline itself (0 by construction)
        delta = numbers["psnr_delta_vs_32_true_db"]
        if name == "32-true repeat":
            noise = delta
            spread_rows.append(f"| val PSNR 32-true run again vs 32-true (same seed and settings: the measurement's "
                               f"noise) | | | {delta:+.4f} dB | | | (information) |")
        elif numbers.get("precision", name) == "32-true":  # another seed (--seeds, --noise-run)
            spread_rows.append(f"| val PSNR {name} vs 32-true after a short run (float32's own spread) | | | "
                               f"{delta:+.4f} dB | | | (information) |")
        else:
            paired.setdefault(numbers.get("precision", name), []).append(delta)
    rows = []
    for name, deltas in paired.items():
        mean = sum(deltas) / len(deltas)
        seeds = f" (mean over {len(deltas)} seeds: " + ", ".join(f"{d:+.4f}" for d in deltas) + ")" if len(deltas) > 1 else ""
        status = judged(abs(mean) <= 0.05, precision['settings'].get('device'))
        if status == "NOT MET" and noise is not None and abs(noise) >= abs(mean):
            status = "INCONCLUSIVE (float32 differs from itself as much)"
        rows.append(f"| val PSNR {name} vs 32-true after a short run{seeds} | | | {mean:+.4f} dB | | within 0.05 dB | "
                    f"{status} |")
    return rows + spread_rows


def weight_grad_rows(results: list | None) -> list[str]:
    """``weight_grad.json`` (scripts/benchmark_weight_grad.py), per case: cuDNN's TF32 weight gradient of a 3x3
    convolution against the fastest other way measured (im2col + cuBLAS, or a Triton configuration)."""
    if results is None:
        return ["| weight gradients of 3x3 convolutions (weight_grad.json) | | | | | | MISSING |"]
    rows = []
    for case in dict.fromkeys(result["case"] for result in results):
        timed = [result for result in results if result["case"] == case and result.get("ms") is not None]
        cudnn = next((result for result in timed if result["method"] == "cudnn"), None)
        others = sorted((result for result in timed if result["method"] != "cudnn"), key=lambda result: result["ms"])
        if cudnn is None or not others:
            rows.append(f"| weight gradient (TF32), {case} | | | no timings (weight_grad.txt) | | | (information) |")
            continue
        best = others[0]
        rows.append(f"| weight gradient (TF32), {case}: cuDNN vs the fastest other way | | {cudnn['ms']:.3f} ms "
                    f"({cudnn['tflops']:.0f} TFLOP/s) cuDNN | {best['ms']:.3f} ms ({best['tflops']:.0f} TFLOP/s) "
                    f"{best['method']}, error {best['error']:.1e} | {cudnn['ms'] / best['ms']:.2f}x cuDNN's speed | | "
                    f"(information) |")
    return rows


GPU_CHECK_LIMIT_S = 360  # issue 9: every target measured in at most 6 minutes on an H100/H200


def duration_rows(duration: dict | None) -> list[str]:
    """How long gpu_check.sh took to measure every target (``duration.json``: from its start, wheels and kernel
    compilation included, to the last target step's end), and the information steps after it."""
    if duration is None:
        return ["| gpu_check.sh: every target measured (duration.json) | | | | | "
                f"<= {GPU_CHECK_LIMIT_S} s | MISSING |"]
    information = duration.get("information_s")
    extra = (f"; the information steps {information} s more" if information is not None
             else "; information steps not run (--information)")
    return [f"| gpu_check.sh: every target measured | | | {duration['targets_s']} s from the start{extra} | | "
            f"<= {GPU_CHECK_LIMIT_S} s | {judged(duration['targets_s'] <= GPU_CHECK_LIMIT_S, duration.get('device'))} |"]


# The measurements of this project's kernels: a case records ``kernel_failures`` where a fused kernel had failed by
# then (it and every later case of the process time the PyTorch fallback).
MEASUREMENT_FILES = ("train_step.json", "compile_bf16.json", "compile_32.json", "gla_targets.json",
                     "gla_targets_bf16.json", "gla_compiled.json", "train_step_heuristics.json")


def kernel_failure_rows(folder: Path) -> list[str]:
    """One correctness row: whether the fused kernels ran throughout the measurements, or which fell back where."""
    measured, failed = False, {}
    for name in MEASUREMENT_FILES:
        results = load(folder, name)
        if results is None:
            continue
        measured = True
        for case in results["cases"] if isinstance(results, dict) else results:
            for module, error in case.get("kernel_failures", {}).items():
                failed.setdefault(f"{module} ({name})", error)
    if not measured:
        return []
    detail = "; ".join(f"{where}: {error[:80]}" for where, error in failed.items())
    return [f"| check: this project's fused kernels ran in every measurement (no PyTorch fallback) | | | | "
            f"{detail} | correct | {'FAIL' if failed else 'PASS'} |"] + left_out_rows(folder)


def left_out_rows(folder: Path) -> list[str]:
    """The fused attention's ways (forward modes, backward variants) that failed a process's first self-check and
    that its timed choices left out (``left_out_variants``), once each: the other ways were measured. The checks
    (check_fused_gla.py, strict) fail on them too."""
    left_out = {}
    for name in MEASUREMENT_FILES:
        results = load(folder, name) or []
        for case in results["cases"] if isinstance(results, dict) else results:
            left_out |= case.get("left_out_variants", {})
    return [f"| fused attention: {way} left out of the timed choices (failed the self-check) | | | | {error[:100]} | "
            f"| (information) |" for way, error in left_out.items()]


def main(folder: Path) -> None:
    rows = ["| what | published | reference | fused | fused vs published | target | status |",
            "|---|---|---|---|---|---|---|"]
    check = load(folder, "check.json")
    for result in (check or {}).get("results", []):
        detail = result.get("error", "")[:100]
        rows.append(f"| check: {result['check']} | | | | {detail} | correct | {result['status']} |")
    if check is None:
        rows.append("| checks (check.json) | | | | | correct | MISSING |")
    rows += kernel_failure_rows(folder)

    duration = load(folder, "duration.json")
    # Without --information gpu_check.sh ran no information step: their files are not missing, just not asked for.
    information = duration is None or duration.get("information_s") is not None
    train_step = load(folder, "train_step.json")
    rows += train_step_rows(train_step, {precision: load(folder, name) for precision, name in COLD_COMPILE_FILES.items()})
    gla_targets = load(folder, "gla_targets.json")
    rows += target_rows(gla_targets, "gla_targets.json", judging=True)
    if information:
        rows += target_rows(load(folder, "gla_targets_bf16.json"), "gla_targets_bf16.json", judging=False)
        rows += target_rows(load(folder, "gla_compiled.json"), "gla_compiled.json", judging=False, project="compiled")
        rows += autotune_rows(train_step, load(folder, "train_step_heuristics.json"))
        rows += weight_grad_rows(load(folder, "weight_grad.json"))
    rows += timed_choice_rows(train_step, (gla_targets or {}).get("cases"))

    precision = load(folder, "precision.json")
    for name, numbers in (precision or {}).get("throughput", {}).items():
        if "error" in numbers:
            rows.append(f"| training step {name} (this project) | | | error: {numbers['error'][:80]} | | | |")
            continue
        rows.append(f"| training step {name}, batch {precision['settings']['batch']} (this project) | | | "
                    f"{1000 * numbers['median_step_s']:.1f} ms, {numbers['peak_memory_mib']:.0f} MiB | | | |")
    rows += psnr_rows(precision)
    if precision is None:
        rows.append("| training steps (precision.json) | | | | | | MISSING |")
    rows += duration_rows(duration)
    if any(row.endswith("| REHEARSAL |") for row in rows):
        rows.insert(0, "Rehearsal: numbers from the CPU at toy sizes check the plumbing and judge no target.\n")
    rows += kernel_lines(gla_targets)
    print("\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
