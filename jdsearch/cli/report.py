"""``jdsearch report``: a study's HTML report and its base-vs-upgraded table."""

from __future__ import annotations

import argparse
from typing import Any

from jdsearch.cli.common import heldout, int_range, storage_url, study_options


def add_report(sub: Any, name: str) -> None:
    rp = sub.add_parser(
        name, help="HTML report with the paper's figures and the base-vs-upgraded table"
    )
    study_options(rp, "the upgraded trial")
    rp.add_argument("--out", required=True, help="report folder (report.html, figures/)")
    rp.add_argument("--device", default="cpu", help="where FPS is measured")
    rp.add_argument(
        "--repeats", type=int_range(1), default=20, help="timed runs per detector for FPS"
    )
    rp.add_argument("--no-fps", action="store_true", help="do not measure FPS")
    rp.add_argument("--no-png", action="store_true", help="do not write PNGs")
    rp.add_argument(
        "--no-attach",
        action="store_true",
        help="do not attach the figures to the study (optuna-dashboard)",
    )
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """``jdsearch report``: write a study's HTML report and print its summary and the
    base-vs-upgraded table; returns 0."""
    from jdsearch.report.compare import compare_study
    from jdsearch.report.html import write_report
    from jdsearch.search.queries import open_study
    from jdsearch.search.summary import summary

    handle = open_study(storage_url(args), args.study)
    comparison = compare_study(
        handle,
        args.trial,
        fps=not args.no_fps,
        device=args.device,
        repeats=args.repeats,
        heldout=heldout(handle),
    )
    files = write_report(
        handle,
        args.out,
        trial=args.trial,
        comparison=comparison,
        png=not args.no_png,
        attach=not args.no_attach,
    )
    print(summary(handle.study))
    print()
    print(comparison.format())
    print()
    print(f"report: {files.html}")
    print(files.png_summary())
    return 0
