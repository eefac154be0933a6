"""Cost against input size: parameters, multiply-accumulates, time and peak memory of each attention variant.

    python scripts/profile_model.py                                  # defaults below, a couple of minutes on a CPU
    python scripts/profile_model.py --models dlsn edsr --sizes 48 96 144 192 256    # on a GPU
    python scripts/profile_model.py --mode training --sizes 24 48    # forward + backward
    python scripts/profile_model.py --plot-only profile/profile.json # redraw the plot
    python scripts/profile_model.py --threads 1 --repeats 5          # steadier timings on a busy CPU

For every model (``--models``: names of ``configs/model/*.yaml``, read from those files, scale
``--scale``), every attention variant (``--variants``: ``model.attention=gla|lsh|nonlocal|none``) and
every LR input size (``--sizes``: square ``S x S`` inputs, batch ``--batch``) it records:

* **parameters** of the network;
* **multiply-accumulates** of one forward pass, counted by :class:`torch.utils.flop_counter.FlopCounterMode`
  (FLOPs / 2) on fake tensors (no arithmetic is done, so any size counts in a moment). Counted:
  convolutions, linear layers and matrix products (GLA's and LSH's chunk scores and weighted values,
  the non-local attention, the hash projections), i.e. the arithmetic of the reference attention path
  (the fused kernel does the same products). Not counted: gathers and scatters (GLA's ``index_select``
  of key rows: data movement, no multiplications), sorting, softmax, and element-wise operations;
* **time**: median wall time over ``--repeats`` runs after ``--warmup`` runs (``--mode inference``: a
  forward pass without autograd, fixed hash rotations; ``training``: forward and backward of the mean
  output, fresh rotations);
* **peak memory** of one run: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
  before it (weights, input); on the CPU the peak resident set size above the one before it (the
  kernel's high-water mark, reset through ``/proc/self/clear_refs`` after ``malloc_trim``).

It runs on the GPU when one is present (``--device`` to choose), else on the CPU (on a CPU shared
with other work, ``--threads 1`` avoids the long stalls of threads waiting for each other), and writes
``<output-dir>/profile.json`` (every row, plus for every series the growth exponent between its two
largest sizes: ``y ~ pixels^k``, ``k = 1`` linear, ``2`` quadratic) and ``profile.png`` (log-log
multiply-accumulates, time and peak memory against pixels, with slope-1 and slope-2 guides). A size
that fails (e.g. out of memory) is recorded with its error and the series' larger sizes are skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from dlsn.models.attention import ATTENTION_VARIANTS
from dlsn.utils.files import atomic_write, atomic_write_text

MODEL_CONFIGS = ROOT / "configs" / "model"
DEFAULT_SIZES = {"cpu": [16, 24, 32, 48, 64], "cuda": [48, 96, 144, 192, 256]}
DEFAULT_MODELS = {"cpu": ["dlsn_small", "edsr"], "cuda": ["dlsn", "edsr"]}


# ------------------------------------------------------------------------------------------- the models

def model_config(name: str) -> dict:
    """``configs/model/<name>.yaml`` as a dict, its ``defaults`` chain merged (without Hydra, which GPU
    machines may lack); interpolated values (``scale``, ``rgb_range``) are left for the caller."""
    config = _merged_yaml(name)
    return {key: value for key, value in config.items() if not (isinstance(value, str) and "${" in value)}


def _merged_yaml(name: str) -> dict:
    import yaml

    path = MODEL_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml")))
        raise SystemExit(f"error: --models {name}: no {path} (known: {known})")
    own = yaml.safe_load(path.read_text()) or {}
    defaults = own.pop("defaults", None) or []
    if "_self_" not in defaults:  # Hydra's rule: the file's own keys after its defaults
        defaults = [*defaults, "_self_"]
    config: dict = {}
    for entry in defaults:
        config.update(own if entry == "_self_" else _merged_yaml(entry))
    return config


def build(name: str, attention: str, scale: int) -> torch.nn.Module:
    import importlib

    config = model_config(name)
    target = config.pop("_target_")
    if "attention" not in config:
        raise SystemExit(f"error: model {name} has no attention setting")
    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(scale=scale, **(config | {"attention": attention}))


# ------------------------------------------------------------------------------------------ measuring

def count_macs(net: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of one forward pass, per operator, on fake tensors (nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.rand(*shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x)
    return {str(op).removeprefix("aten."): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _release_freed_cpu_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def cpu_peak_supported() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_mib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def peak_memory_mib(run, device: torch.device, cpu_peak: bool) -> float | None:
    """Peak memory of ``run()`` above what was in use before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not cpu_peak:
        run()
        return None
    _release_freed_cpu_memory()
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
    before = _proc_status_mib("VmRSS")
    run()
    return max(0.0, _proc_status_mib("VmHWM") - before)


def median_seconds(run, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_series(name: str, attention: str, args, device: torch.device, cpu_peak: bool) -> list[dict]:
    torch.manual_seed(0)
    net = build(name, attention, args.scale)
    parameters = sum(p.numel() for p in net.parameters())
    net = net.to(device).train(args.mode == "training")
    if args.mode == "inference" and hasattr(net, "set_rotation_seed"):
        net.set_rotation_seed(0)
    rows = []
    for size in args.sizes:
        shape = (args.batch, 3, size, size)
        row = dict(model=name, attention=attention, size=size, batch=args.batch, pixels=size * size,
                   parameters=parameters)
        try:
            macs = count_macs(net, shape)
            row.update(macs=sum(macs.values()), macs_by_operator=macs)
            x = torch.rand(*shape, device=device)
            if args.mode == "inference":
                def run():
                    with torch.no_grad():
                        net(x)
            else:
                def run():
                    net.zero_grad(set_to_none=True)
                    net(x).mean().backward()
            for _ in range(args.warmup):  # first calls: one-time allocations, kernel selection
                run()
            row["peak_memory_mib"] = peak_memory_mib(run, device, cpu_peak)
            row["time_s"] = median_seconds(run, device, args.repeats)
        except Exception as err:  # noqa: BLE001 - record it (e.g. out of memory) and skip larger sizes
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rows.append(row)
            print(f"{name:11s} {attention:9s} {size:4d}x{size:<4d} failed: {row['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        rows.append(row)
        memory = "n/a" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:9.1f} MiB"
        print(f"{name:11s} {attention:9s} {size:4d}x{size:<4d} {parameters:>11,d} params "
              f"{row['macs'] / 1e9:10.3f} GMAC {row['time_s'] * 1e3:10.2f} ms  peak {memory}", flush=True)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def growth_exponents(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per series, ``k`` in ``y ~ pixels^k`` between its two largest measured sizes."""
    result = {}
    for series in dict.fromkeys((r["model"], r["attention"]) for r in rows):
        measured = [r for r in rows if (r["model"], r["attention"]) == series and "error" not in r]
        exponents = {}
        for key in ("macs", "time_s", "peak_memory_mib"):
            points = [(r["pixels"], r[key]) for r in measured if r.get(key)]
            if len(points) < 2:
                exponents[key] = None
                continue
            (p0, y0), (p1, y1) = points[-2], points[-1]
            exponents[key] = round(math.log(y1 / y0) / math.log(p1 / p0), 3)
        result[f"{series[0]}/{series[1]}"] = exponents
    return result


# -------------------------------------------------------------------------------------------- the plot

def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    rows = [r for r in report["rows"] if "error" not in r]
    panels = [("macs", "multiply-accumulates"), ("time_s", "time (s)"), ("peak_memory_mib", "peak memory (MiB)")]
    figure = Figure(figsize=(16, 5.2), layout="constrained")
    axes = figure.subplots(1, len(panels))
    series = list(dict.fromkeys((r["model"], r["attention"]) for r in rows))
    styles = {model: style for model, style in zip(dict.fromkeys(m for m, _ in series), ["-", "--", ":", "-."] * 4)}
    colours = {variant: f"C{i}" for i, variant in enumerate(ATTENTION_VARIANTS)}
    for axis, (key, label) in zip(axes, panels):
        lowest = None
        for model, attention in series:
            points = [(r["pixels"], r[key]) for r in rows if (r["model"], r["attention"]) == (model, attention)
                      and r.get(key)]
            if not points:
                continue
            axis.plot(*zip(*points), styles[model], marker="o", color=colours.get(attention, "k"),
                      label=f"{model} {attention}")
            lowest = points[0] if lowest is None else min(lowest, points[0], key=lambda p: p[1])
        if lowest is not None:  # slope guides through the lowest first point
            pixels = sorted({r["pixels"] for r in rows})
            for exponent, guide_style in ((1, (0, (4, 4))), (2, (0, (1, 3)))):
                axis.plot(pixels, [lowest[1] * (p / lowest[0]) ** exponent for p in pixels], color="grey",
                          linestyle=guide_style, linewidth=1, label=f"~ pixels^{exponent}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        sizes = sorted({r["size"] for r in rows})
        axis.set_xticks([size * size for size in sizes], [f"{size}x{size}" for size in sizes], fontsize=8)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("input pixels (LR, log scale)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{report['mode']} on {report['device_name']} (batch {report['batch']}, x{report['scale']}); "
                    f"dashed grey: linear, dotted grey: quadratic growth", fontsize=10)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100), mode="wb")


# --------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="configs/model names (default: dlsn_small edsr on the CPU, "
                                                    "dlsn edsr on a GPU)")
    parser.add_argument("--variants", nargs="+", default=list(ATTENTION_VARIANTS), choices=ATTENTION_VARIANTS)
    parser.add_argument("--sizes", nargs="+", type=int, help="LR sizes S (inputs S x S; default 16 24 32 48 64 "
                                                             "on the CPU, 48 96 144 192 256 on a GPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--mode", choices=("inference", "training"), default="inference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 gives steadier "
                                                    "CPU timings on a machine shared with other work")
    parser.add_argument("--output-dir", type=Path, default=Path("profile"))
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw the plot of a profile.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        report = json.loads(args.plot_only.read_text())
        plot(report, args.plot_only.with_suffix(".png"))
        print(f"wrote {args.plot_only.with_suffix('.png')}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = sorted(args.sizes or DEFAULT_SIZES[device.type])
    args.models = args.models or DEFAULT_MODELS[device.type]
    cpu_peak = device.type == "cpu" and cpu_peak_supported()
    if device.type == "cpu" and not cpu_peak:
        print("note: /proc/self/clear_refs is not writable here: no CPU peak memory", file=sys.stderr)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    rows = []
    for name in args.models:
        for attention in args.variants:
            rows += profile_series(name, attention, args, device, cpu_peak)
    report = dict(device=str(device), device_name=device_name, torch=torch.__version__, mode=args.mode,
                  batch=args.batch, scale=args.scale, sizes=args.sizes, cpu_threads=torch.get_num_threads(),
                  growth_exponents=growth_exponents(rows), rows=rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.output_dir / "profile.json", args.output_dir / "profile.png"
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    plot(report, png_path)
    print("growth exponent k (y ~ pixels^k) between the two largest sizes:")
    for series, exponents in report["growth_exponents"].items():
        print(f"  {series:22s} " + "  ".join(f"{key} {value}" for key, value in exponents.items()))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
