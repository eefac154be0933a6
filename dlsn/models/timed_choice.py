"""Pick the fastest of interchangeable GPU implementations by timing them once, as cuDNN's autotuner does.

Two computations of GLA have several implementations that give the same result up to float32
rounding, but whose speed depends on the GPU, its libraries and the sizes:

* the fused attention's backward (``BACKWARD_MODE`` in :mod:`dlsn.models.chunk_attention`): dQ from
  its own kernel, or added by the key kernel with atomic additions (about 30% fewer multiply-adds,
  but contended atomics); in float32, each with a few launch configurations of the key or values kernel;
* the match embedding's float32 convolution (``FLOAT32_CONV_METHOD`` in
  :mod:`dlsn.models.float32_ops`): cuDNN without TF32, or TF32 tensor-core products of split operands.

With ``"timed"`` (their default), :func:`fastest` runs every candidate once (compilation, library
plans), then times each a few times, interleaved, and keeps the fastest for that key (device, sizes,
precision) for the rest of the process. It follows cuDNN's own switch, ``torch.backends.cudnn.benchmark``:
it times only where that is on (the training steps of the paper recipes, ``dlsn.callbacks.CudnnAutotune``),
and never where deterministic algorithms are requested. Elsewhere (evaluation, the CPU) the default
implementation runs, so results there never depend on a timing. During CUDA-graph capture a choice
made before is kept, and nothing is timed.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Hashable, Mapping

import torch

log = logging.getLogger(__name__)

REPEATS = 3  # timed runs per candidate, after one untimed run
_choices: dict[Hashable, dict] = {}


def timing_allowed(device: torch.device) -> bool:
    """Whether a choice may be timed on ``device`` now: CUDA, cuDNN's autotuner on, no deterministic algorithms."""
    return (device.type == "cuda" and torch.backends.cudnn.benchmark
            and not torch.are_deterministic_algorithms_enabled())


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def milliseconds(run: Callable[[], object], device: torch.device) -> float:
    """Device time of ``run()`` on the current stream, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        start.record()
        run()
        end.record()
    end.synchronize()
    return start.elapsed_time(end)


Candidates = Mapping[str, Callable[[], object]]


def fastest(key: Hashable, candidates: Candidates | Callable[[], Candidates], *, device: torch.device,
            default: str) -> str:
    """The name of the fastest of ``candidates`` (functions computing the same thing, by name; or a
    function that returns them, called only when they are timed) for ``key``; ``default`` where timing
    is not allowed (:func:`timing_allowed`) or, without an earlier choice, during CUDA-graph capture.
    A candidate that raises is left out (warned); if all do, the first error is raised."""
    if not timing_allowed(device):
        return default
    if key in _choices:
        return _choices[key]["choice"]
    if capturing(device):
        return default
    working, errors = {}, []
    for name, run in (candidates() if callable(candidates) else candidates).items():
        try:
            run()
        except Exception as error:  # e.g. a launch configuration this GPU cannot run
            log.warning("dlsn: %s: %s failed, left out (%s: %s)", _described(key), name,
                        type(error).__name__, error)
            errors.append(error)
        else:
            working[name] = run
    if not working:
        raise errors[0]
    times: dict[str, list[float]] = {name: [] for name in working}
    for _ in range(REPEATS):
        for name, run in working.items():  # interleaved: clock changes affect every candidate alike
            times[name].append(milliseconds(run, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    choice = min(medians, key=medians.get)
    _choices[key] = {"choice": choice, "ms": medians}
    log.info("dlsn: %s", report(_described(key), _choices[key]))
    return choice


def _described(key: Hashable) -> str:
    return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def choices() -> dict[str, dict]:
    """Every choice timed in this process, for reports: ``{"what device sizes ...": {"choice", "ms"}}``."""
    return {_described(key): {"choice": entry["choice"], "ms": dict(entry["ms"])}
            for key, entry in _choices.items()}


def report(what: str, entry: dict) -> str:
    """One line for an entry of :func:`choices`: what was chosen, and every candidate's time."""
    return f"{what}: {entry['choice']} (" + ", ".join(f"{name} {ms:.3f} ms" for name, ms in entry["ms"].items()) + ")"


def forget() -> None:
    """Drop every choice made so far: the next use times again."""
    _choices.clear()
