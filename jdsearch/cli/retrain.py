"""``jdsearch noise`` and ``jdsearch finetune``: train a finished study's trial again, with other
seeds (the noise floor) or for longer (a child trial)."""

from __future__ import annotations

import argparse
from typing import Any

from jdsearch.cli.common import finite_float, int_range, storage_url, study_options


def add_noise(sub: Any, name: str) -> None:
    n = sub.add_parser(
        name, help="re-run a trial with other seeds: the spread of H and AP (the noise floor)"
    )
    study_options(n, "trial to re-run")
    n.add_argument("--seeds", type=int_range(2), default=3, help="re-runs (other training seeds)")
    n.set_defaults(func=cmd_noise)


def cmd_noise(args: argparse.Namespace) -> int:
    """``jdsearch noise``: re-run a trial (default: the best) with other training seeds, print
    and store the spread of its H and AP; returns 0."""
    from jdsearch.search.noise import measure_noise
    from jdsearch.search.queries import open_study
    from jdsearch.search.session import prepare

    url = storage_url(args)
    handle = open_study(url, args.study)
    study, ctx = prepare(handle.spec, url, progress=False, stored=True)
    floor = measure_noise(study, ctx, args.trial, seeds=args.seeds)
    print(
        f"trial {floor.trial}: recorded H {floor.recorded_h:.4f}, AP {100 * floor.recorded_ap:.1f}"
    )
    for seed, h, ap in zip(floor.seeds, floor.h, floor.ap, strict=True):
        print(f"  seed {seed}: H {h:.4f}, AP {100 * ap:.1f}")
    print(floor.describe())
    return 0


def add_finetune(sub: Any, name: str) -> None:
    ft = sub.add_parser(
        name,
        help="train a trial's student longer with its teacher: a child trial export can pick",
    )
    study_options(ft, "trial to fine-tune")
    ft.add_argument("--epochs", type=finite_float, required=True, help="training epochs")
    ft.add_argument(
        "--lr", type=finite_float, default=None, help="peak lr (default: the fast eval's)"
    )
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``jdsearch finetune``: train a trial's pair (default: the best) longer as a child trial of
    the study, print it beside its parent; returns 0."""
    from jdsearch.search.finetune import check_request, finetune
    from jdsearch.search.queries import open_study
    from jdsearch.search.record import TrialRecord
    from jdsearch.search.session import prepare
    from jdsearch.search.summary import summary_cells

    check_request(args.epochs, args.lr)  # the flags, before the study is opened
    url = storage_url(args)
    handle = open_study(url, args.study)
    study, ctx = prepare(handle.spec, url, progress=not args.quiet, stored=True)
    child = finetune(study, ctx, args.trial, epochs=args.epochs, lr=args.lr)
    parent = next(t for t in study.get_trials() if t.number == TrialRecord.from_trial(child).parent)
    before, after = summary_cells(parent), summary_cells(child)
    print(f"{'':<12}{f'trial {parent.number}':<20}fine-tuned (trial {child.number})")
    for key in before:
        print(f"{key:<12}{before[key]:<20}{after[key]}")
    print(f"export it: jdsearch export --study {study.study_name} --trial {child.number} --out DIR")
    return 0
