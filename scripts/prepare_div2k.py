"""Download and extract DIV2K (HR and official bicubic LR archives), resumably, with checksums.

    python scripts/prepare_div2k.py --root data/DIV2K                 # everything (x2, x3, x4)
    python scripts/prepare_div2k.py --root data/DIV2K --scales 4 --splits valid --no-lr

Already extracted folders are kept, so an existing copy only needs --root. SHA-256 sums of
completed downloads are recorded in <root>/checksums.json and checked on later downloads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dlsn.data.div2k import DIV2K_URL, DownloadError, prepare_div2k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/DIV2K"))
    parser.add_argument("--splits", nargs="+", default=["train", "valid"], choices=["train", "valid"])
    parser.add_argument("--scales", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    parser.add_argument("--no-hr", action="store_true", help="skip the HR archives")
    parser.add_argument("--no-lr", action="store_true", help="skip the bicubic LR archives")
    parser.add_argument("--keep-archives", action="store_true", help="keep the .zip files after extraction")
    parser.add_argument("--base-url", default=DIV2K_URL)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root = prepare_div2k(args.root, args.splits, args.scales, hr=not args.no_hr, lr=not args.no_lr,
                             base_url=args.base_url, keep_archives=args.keep_archives, timeout=args.timeout)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"DIV2K ready under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
