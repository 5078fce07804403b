"""What a search prints: one line per finished trial, and base against best with the lineage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.engine.evaluate import evaluate
from jdsearch.search.queries import StudyHandle, best_of, front_of, lineage_of, root_of
from jdsearch.search.record import (
    BASE_ATTR,
    BASE_RESOLUTION_ATTR,
    FAIL_REASON_ATTR,
    MOVE_PARAM,
    STRATEGY_ATTR,
    TRACEBACK_SYSATTR,
    TrialRecord,
)
from jdsearch.search.teacher_check import kd_summary
from jdsearch.store.checkpoint import checkpoint_from_bytes


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line for a finished trial (an ``optimize`` callback)."""
    r = TrialRecord.from_trial(trial)
    move = str(r.move)
    if trial.state != optuna.trial.TrialState.COMPLETE:
        reason = trial.user_attrs.get(FAIL_REASON_ATTR)
        why = f": {reason}" if reason else ""
        where = trial.system_attrs.get(TRACEBACK_SYSATTR)  # search.failures
        why += f" (traceback in {where})" if where else ""
        print(f"trial {trial.number:3d}  {move:<20} {trial.state.name}{why}", flush=True)
        return
    c = summary_cells(trial)
    parent = "-" if r.parent is None else r.parent
    print(
        f"trial {trial.number:3d}  {move:<20} from {parent:>3}: H {c['H']}  "
        f"AP {c['AP']} at {c['resolution']}  GFLOPs {c['GFLOPs']}  teacher {r.teacher or 'none'}",
        flush=True,
    )


def print_stopped(trial: optuna.Trial | optuna.trial.FrozenTrial, reason: str) -> None:
    """One line for a trial this worker stopped without telling it (``STOPPED``, then why):
    another worker failed it as stale and re-queued it."""
    move = str(trial.params.get(MOVE_PARAM, "?"))
    print(f"trial {trial.number:3d}  {move:<20} STOPPED: {reason}", flush=True)


def lineage_line(trials: Sequence[optuna.trial.FrozenTrial], number: int) -> str:
    """``base (#0) -> layer_prune (#2) -> …``: the moves from the root to trial ``number``."""
    path = [TrialRecord.from_trial(t) for t in lineage_of(trials, number)]
    return " -> ".join(f"{t.move} (#{t.number})" for t in path)


def summary_cells(t: optuna.trial.FrozenTrial) -> dict[str, str]:
    """H, and AP / GFLOPs / params at the resolution where the trial scored best."""
    r = TrialRecord.from_trial(t)
    ap = r.metric_at(r.best_resolution)
    flops, _ = r.flops_where_scored()
    return {
        "H": f"{r.value if r.value is not None else float('nan'):.4f}",
        "AP": "-" if ap is None else f"{100 * ap:.1f}",
        "GFLOPs": f"{(flops or 0) / 1e9:.3f}",
        "params (M)": f"{(r.params or 0) / 1e6:.3f}",
        "resolution": str(r.best_resolution or ""),
    }


def summary(study: optuna.Study) -> str:
    """Base vs best student: H, AP, FLOPs, resolution, and the lineage path of moves."""
    trials = study.get_trials(deepcopy=False)
    root, best = root_of(trials), best_of(trials)
    if root is None or best is None:
        return "no completed trial yet"
    base, top = summary_cells(root), summary_cells(best)
    r0, r1 = TrialRecord.from_trial(root), TrialRecord.from_trial(best)
    lines = [f"{'':<12}{f'base (trial {root.number})':<20}best (trial {best.number})"]
    lines += [f"{k:<12}{base[k]:<20}{top[k]}" for k in base]
    lines.append(f"student     {r0.student}")
    lines.append(f"        ->  {r1.student}")
    if r0.teacher or r1.teacher:
        lines.append(f"teacher     {r0.teacher or 'none'}  ->  {r1.teacher or 'none'}")
    else:
        lines.append("teacher     none (no distillation)")
    lines.append("lineage     " + lineage_line(study.get_trials(deepcopy=False), best.number))
    if len(study.directions) > 1:  # score.mode: pareto
        front = [(t.number, TrialRecord.from_trial(t).point()) for t in front_of(trials)]
        cells = [f"#{n} (AP {100 * p[0]:.1f}, cost {p[1]:.3f})" for n, p in front if p]
        lines.append(f"front       {len(front)} non-dominated: " + ", ".join(cells))
    strategy = study.user_attrs.get(STRATEGY_ATTR, "hill_climb")  # 0.1 studies: hill climbing
    lines.append(f"search      {strategy}, KD {kd_summary(study.user_attrs)}")
    return "\n".join(lines)


def heldout_verdict(handle: StudyHandle, heldout: CocoDataset, device: str = "cpu") -> str:
    """The base as given (at R_base) and the best trial (where it scored best), judged on the
    held-out split the search never saw: AP, cost and whether the winner is an *upgrade* (more
    held-out AP at less cost) or a *trade* (less cost for less AP).

    The base is the study's base checkpoint itself, not the root trial: what the user had before
    the search. The cost is the score's (C/C_base)·(R/R_base)^β, 1 for the base.
    """
    best = handle.trial()
    r1 = TrialRecord.from_trial(best)
    size = r1.best_resolution or ""
    cost = r1.cost.get(size)
    base_size = str(handle.study.user_attrs.get(BASE_RESOLUTION_ATTR) or size)
    base = checkpoint_from_bytes(handle.study_artifact(BASE_ATTR), source="base", device=device)
    base_ap = _heldout_ap(base.detector, heldout, base_size, device)
    best_ap = _heldout_ap(handle.checkpoint(best, device=device).detector, heldout, size, device)
    gain = 100 * (best_ap - base_ap)
    if cost is None:
        verdict = "cost not recorded"
    elif gain > 0 and cost < 1:
        verdict = f"an upgrade: {gain:+.1f} AP at {cost:.2f}× the cost"
    elif cost < 1:
        verdict = f"a trade: {gain:+.1f} AP for {cost:.2f}× the cost"
    else:
        verdict = f"no cheaper: {gain:+.1f} AP at {cost:.2f}× the cost"
    cost_cell = "-" if cost is None else f"{cost:.2f}"
    return "\n".join(
        [
            f"held-out    {'base (as given)':<20}best (trial {best.number})   "
            f"({len(heldout)} images the search never saw)",
            f"AP          {f'{100 * base_ap:.1f} at {base_size}':<20}{100 * best_ap:.1f} at {size}",
            f"cost        {'1.00':<20}{cost_cell}",
            f"verdict     {verdict}",
        ]
    )


def _heldout_ap(detector: Any, data: CocoDataset, size: str, device: str) -> float:
    return float(evaluate(detector, data, [Resolution.parse(size)], device=device)[size].AP)
