"""The ``jdsearch`` command line: parse, call the modules, print. No logic lives here.

One module per command or command group, each with the function that adds its sub-parser beside
the ``cmd_*`` handler that sub-parser calls; :data:`COMMANDS` registers them by name and
:func:`build_parser` builds the top-level parser from it. ``common`` holds what several commands
share.

The app layer: it may import every jdsearch layer (``docs/architecture.md``), but only inside the
command handlers, so that ``jdsearch --help`` imports neither torch nor optuna; nothing below the
app layer imports it. ``python -m jdsearch`` and ``python -m jdsearch.cli`` run :func:`main`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jdsearch.cli import (
    checkpoint,
    data,
    export,
    gc,
    measure,
    pool,
    report,
    retrain,
    search,
    status,
    train,
)
from jdsearch.cli.common import Parser, flag_message
from jdsearch.core.config import FieldError
from jdsearch.core.errors import JDSearchError, RanksOutOfStep
from jdsearch.engine.threads import passive_openmp_threads

log = logging.getLogger("jdsearch")

#: Every sub-command, in the order ``jdsearch --help`` lists them: its name and the function that
#: adds its sub-parser under that name to the ``add_subparsers()`` object it is given.
COMMANDS: dict[str, Callable[[Any, str], None]] = {
    "flops": measure.add_flops,
    "data": data.add_data,
    "train": train.add_train,
    "import": checkpoint.add_import,
    "eval": train.add_eval,
    "evolve": checkpoint.add_evolve,
    "init": search.add_init,
    "search": search.add_search,
    "status": status.add_status,
    "pool": pool.add_pool,
    "export": export.add_export,
    "predict": export.add_predict,
    "latency": measure.add_latency,
    "report": report.add_report,
    "noise": retrain.add_noise,
    "finetune": retrain.add_finetune,
    "gc": gc.add_gc,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``jdsearch`` argument parser with every sub-command of :data:`COMMANDS`; each sets
    ``func`` to its ``cmd_*``."""
    p = Parser(
        prog="jdsearch",
        description="Upgrade a Faster R-CNN FPN detector with joint NAS, pruning and dynamic distillation.",
    )
    verbose = "debug logging, and the traceback of every failed trial"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest for tiny detectors on a busy machine)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, add in COMMANDS.items():
        add(sub, name)
        # also after the command (`jdsearch search S -v`); unset there, it leaves the global one
        sub.choices[name].add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``). Returns the exit status: the
    command's, 2 after printing a :class:`JDSearchError`, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    passive_openmp_threads()
    import warnings

    # optuna marks heartbeats and artifacts experimental; the CLI relies on them on purpose.
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    warnings.filterwarnings("ignore", message=".*experimental feature.*")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if getattr(args, "device", None) is not None:
            from jdsearch.engine.latency import check_device

            check_device(args.device, "--device")
        if args.threads is not None:
            if args.threads < 1:
                raise JDSearchError(f"--threads must be ≥ 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except JDSearchError as e:
        message = flag_message(e, args) if isinstance(e, FieldError) else str(e)
        print(f"jdsearch: error: {message}", file=sys.stderr)
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        return 2
    except RanksOutOfStep as e:  # under torchrun: torchrun stops the other ranks
        print(f"jdsearch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jdsearch: interrupted", file=sys.stderr)
        return 130
