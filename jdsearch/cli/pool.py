"""``jdsearch pool train``: train a study's elastic teacher pool."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_pool(sub: Any, name: str) -> None:
    pl = sub.add_parser(name, help="elastic teacher pool").add_subparsers(
        dest="pool_command", required=True
    )
    pt = pl.add_parser(
        "train", help="train a study's teacher pool with integrated progressive shrinking"
    )
    pt.add_argument("study")
    pt.add_argument("--out", help="pool file (default runs/NAME/pool.safetensors)")
    pt.add_argument("--quiet", action="store_true")
    pt.set_defaults(func=cmd_pool_train)


def cmd_pool_train(args: argparse.Namespace) -> int:
    """``jdsearch pool train``: train the study's elastic teacher pool and save it (default
    ``runs/NAME/pool.safetensors``); returns 0."""
    from jdsearch.methods.pool import train_and_save_pool
    from jdsearch.search.assets import ensure_data, pool_start
    from jdsearch.search.caches import pool_fields, run_dir
    from jdsearch.spec.study import load_study

    spec = load_study(args.study)
    pool_spec = spec.pool
    train_set, _ = ensure_data(spec)
    out = Path(args.out) if args.out else run_dir(spec) / "pool.safetensors"
    fields = pool_fields(spec)
    pool = train_and_save_pool(
        pool_spec,
        train_set,
        out,
        device=spec.device,
        progress=not args.quiet,
        base=pool_start(spec),
        # Recorded in the file (a study naming it, pool.checkpoint, checks them), and keying its
        # phase state as a search's does: the default --out is its cache.
        made_by=fields,
    )
    print(f"saved {out}: space {pool.space.describe()} ({pool.space.size()} sub-networks)")
    return 0
