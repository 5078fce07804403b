"""``jdsearch init`` and ``jdsearch search``: write a study spec for a dataset, then run (resume,
join) its search."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from jdsearch.cli.data import SPLIT_FILES, add_split_files, data_folder
from jdsearch.core.errors import JDSearchError
from jdsearch.engine.threads import small_detector_threads, study_gflops


def add_init(sub: Any, name: str) -> None:
    i = sub.add_parser(name, help="write a commented study spec for your COCO dataset")
    i.add_argument("--data", help="dataset folder with images/, train.json and val.json")
    add_split_files(i)
    i.add_argument(
        "--base",
        default="r50-fpn",
        help="trained checkpoint (.safetensors), or detector preset/YAML the study trains "
        "(default r50-fpn)",
    )
    i.add_argument("--out", required=True, help="study spec to write, e.g. studies/NAME.yaml")
    i.add_argument("--name", help="study name (default: the --out file's stem)")
    i.add_argument(
        "--device",
        dest="study_device",
        help="the study's device (default cpu: the same file on every machine; each worker may "
        "override it with search --device)",
    )
    i.add_argument("--force", action="store_true", help="overwrite --out and what it needs")
    i.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    """``jdsearch init``: write a commented study spec for a dataset and a base detector and
    print what it chose; returns 0."""
    from jdsearch.init.init_study import data_files, init_study
    from jdsearch.spec.settings import is_device
    from jdsearch.spec.study import NAME_RULE, is_study_name

    name = args.name or Path(args.out).stem
    # the flags, named as typed (the spec written from them would name its own fields)
    if not is_study_name(name):
        flag = f"--name {name!r}" if args.name else f"--out {args.out}: its stem {name!r}"
        raise JDSearchError(
            f"{flag}: a study name must {NAME_RULE}" + ("" if args.name else "; or give --name")
        )
    if args.study_device is not None and not is_device(args.study_device):
        raise JDSearchError(
            f"--device {args.study_device!r}: expected a device such as cpu or cuda:0"
        )
    files = data_files(
        args.data and data_folder(args.data, SPLIT_FILES),
        args.train,
        args.val,
        args.images,
        train_images=args.train_images,
        val_images=args.val_images,
    )
    result = init_study(
        args.out, files, base=args.base, name=name, device=args.study_device, force=args.force
    )
    print("\n".join(result.lines))
    return 0


def add_search(sub: Any, name: str) -> None:
    q = sub.add_parser(name, help="run (or resume, or join) a Joint-DetNAS search")
    q.add_argument("study", help="study spec YAML or preset name (e.g. quickstart)")
    q.add_argument(
        "--storage", help="Optuna storage URL (default: the spec's, sqlite:///runs/NAME.db)"
    )
    q.add_argument(
        "--n-trials", type=int, default=None, help="trials this worker adds (default: the spec's)"
    )
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument(
        "--device",
        help="this worker's device, overriding the spec's (e.g. cuda:1); the study is unchanged",
    )
    q.add_argument(
        "--check",
        action="store_true",
        help="check the spec, data, base checkpoint and pool space and print the plan with a "
        "time estimate; trains nothing",
    )
    q.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    """``jdsearch search``: add trials to the study spec's search and print the study summary;
    returns 0 (a search in which none of this worker's trials completed raises instead)."""
    from jdsearch.search.run import run_search
    from jdsearch.search.summary import summary
    from jdsearch.spec.study import load_study

    if args.n_trials is not None and args.n_trials < 1:
        raise JDSearchError(f"--n-trials must be ≥ 1, got {args.n_trials}")
    spec = load_study(args.study)
    device = args.device  # checked by the CLI's main, as every --device is
    small_detector_threads(args.threads, study_gflops(spec))
    if args.check:
        from jdsearch.search.check import check_study

        checked = spec if device is None else dataclasses.replace(spec, device=device)
        print("\n".join(check_study(checked, storage_url=args.storage).lines))
        print("ok: nothing was trained")
        return 0
    from jdsearch.engine import distributed

    try:
        study = run_search(
            spec, args.storage, n_trials=args.n_trials, progress=not args.quiet, device=device
        )
        if distributed.is_main():  # under torchrun, rank 0 speaks for the worker
            print(summary(study))
            _print_heldout_verdict(args.storage or spec.storage_url, spec.name, device)
    finally:
        if not distributed.out_of_step():  # else a collective may never return: just exit
            distributed.shutdown()
    return 0


def _print_heldout_verdict(url: str, name: str, device: str | None) -> None:
    """The base as given against the winner on the held-out split: an upgrade or a trade."""
    from jdsearch.cli.common import heldout
    from jdsearch.search.queries import open_study
    from jdsearch.search.summary import heldout_verdict

    handle = open_study(url, name)
    split = heldout(handle)
    if split is not None:
        print(heldout_verdict(handle, split, device=device or "cpu"))
