"""``jdsearch gc``: remove the artifacts no study of a storage reads again."""

from __future__ import annotations

import argparse
from typing import Any

from jdsearch.cli.common import finite_float
from jdsearch.core.errors import JDSearchError


def add_gc(sub: Any, name: str) -> None:
    g = sub.add_parser(
        name,
        help="remove artifacts no study reads again: partial uploads, failed trials' checkpoints",
    )
    g.add_argument("--storage", required=True, help="the studies' storage URL")
    g.add_argument(
        "--older-than",
        type=finite_float,
        default=3600.0,
        metavar="S",
        help="only what is older than S seconds (default 3600; 0 only when no worker runs)",
    )
    g.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    g.set_defaults(func=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    """``jdsearch gc``: remove the artifacts no study of a storage reads again (partial uploads,
    failed trials' checkpoints, unreferenced uploads), printing each; returns 0."""
    from jdsearch.search.queries import open_storage
    from jdsearch.search.record import artifact_holders
    from jdsearch.storage.gc import collect, describe, summary
    from jdsearch.storage.rdb import with_driver

    if not args.older_than >= 0:
        raise JDSearchError(f"--older-than must be a number of seconds ≥ 0, got {args.older_than}")
    try:
        url = with_driver(args.storage)
    except JDSearchError as e:
        raise JDSearchError(f"--storage {e}") from None
    storage, _ = open_storage(url)
    removed = collect(
        storage, url, artifact_holders(), older_than_s=args.older_than, dry_run=args.dry_run
    )
    for r in removed:
        print(describe(r, args.dry_run))
    print(summary(removed, args.dry_run))
    return 0
