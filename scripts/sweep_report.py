"""Summarise a Hydra sweep directory: a table and a plot of every job (finished, failed, interrupted, running).

Writes sweep_summary.csv, sweep_summary.md and sweep_psnr.png into the directory (the files a multirun
writes itself when it ends, see docs/scaling.md) and prints the markdown table. Works on a sweep that
is still running, was interrupted, or was run before the summary existed.

    python scripts/sweep_report.py logs/train/multiruns/2026-01-01_10-00-00_000000 [--no-plot]
"""

from dlsn.sweep_report import main

if __name__ == "__main__":
    raise SystemExit(main())
