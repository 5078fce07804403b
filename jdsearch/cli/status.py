"""``jdsearch status``: a study's live workers, trial counts, best H and time left."""

from __future__ import annotations

import argparse
import json
from typing import Any

from jdsearch.cli.common import storage_url


def add_status(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name, help="a study's live workers, trial counts, best H so far and time left"
    )
    p.add_argument("--study", help="study name (optional when the storage holds one study)")
    p.add_argument("--storage", help="the study's storage URL (default sqlite:///runs/NAME.db)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """``jdsearch status``: print the status of a study, searched or not; returns 0."""
    from jdsearch.search.queries import read_study
    from jdsearch.search.status import study_status

    study, spec = read_study(storage_url(args), args.study)
    status = study_status(study, spec.search.n_trials, spec.search.heartbeat_s)
    print(json.dumps(status.to_dict(), indent=1) if args.json else status.format())
    return 0
