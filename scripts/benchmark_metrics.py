"""Peak memory and time of the evaluation metrics (Y PSNR/SSIM) on one large image.

    python scripts/benchmark_metrics.py                     # 2000x2000, CPU (and CUDA when available)
    python scripts/benchmark_metrics.py --size 2040 1356 --repeat 3

Each measurement runs in a fresh subprocess. CPU: the growth of the process's peak resident memory
(``ru_maxrss``) over its resident memory just before the call, with the SR/HR tensors already made.
CUDA: ``torch.cuda.max_memory_allocated`` over the memory allocated before the call. Inputs are float32
``[1, 3, H, W]`` tensors in [0, 1], as the validation loop passes them. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize()


def measure(metric: str, height: int, width: int, device: str, repeat: int) -> dict:
    """One measurement in this process: extra peak memory (MiB) and the best time (s) of ``metric``."""
    import torch

    from dlsn.metrics import psnr_y, ssim_y

    torch.manual_seed(0)
    fn = {"psnr_y": psnr_y, "ssim_y": ssim_y}[metric]
    hr = torch.rand(1, 3, height, width, device=device)
    sr = hr.clone().add_(0.01).clamp_(0, 1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    value = None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn(sr, hr, 4)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
    return {"metric": metric, "device": device, "size": f"{height}x{width}", "extra_peak_mib": peak / 2**20,
            "best_s": min(times), "value": value}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs=2, type=int, default=[2000, 2000], metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=1, help="calls per measurement (best time is printed)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--child", nargs=2, metavar=("METRIC", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    height, width = args.size
    if args.child:
        print(json.dumps(measure(args.child[0], height, width, args.child[1], args.repeat)))
        return 0
    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"{'metric':8s} {'device':6s} {'size':>10s} {'extra peak MiB':>15s} {'time s':>8s}  value")
    for device in devices:
        for metric in ("psnr_y", "ssim_y"):
            cmd = [sys.executable, __file__, "--size", str(height), str(width), "--repeat", str(args.repeat),
                   "--child", metric, device]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{row['metric']:8s} {row['device']:6s} {row['size']:>10s} {row['extra_peak_mib']:15.1f} "
                  f"{row['best_s']:8.3f}  {row['value']:.12g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
