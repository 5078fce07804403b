"""What a search prints: one line per finished trial, and base against best with the lineage."""

from __future__ import annotations

import optuna

from jdsearch.search.queries import best_of, front_of, lineage, root_of
from jdsearch.search.record import FAIL_REASON_ATTR, STRATEGY_ATTR, TrialRecord
from jdsearch.search.teacher_check import kd_summary


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line for a finished trial (an ``optimize`` callback)."""
    r = TrialRecord.from_trial(trial)
    move = str(r.move)
    if trial.state != optuna.trial.TrialState.COMPLETE:
        reason = trial.user_attrs.get(FAIL_REASON_ATTR)
        why = f": {reason}" if reason else ""
        print(f"trial {trial.number:3d}  {move:<20} {trial.state.name}{why}", flush=True)
        return
    c = summary_cells(trial)
    parent = "-" if r.parent is None else r.parent
    print(
        f"trial {trial.number:3d}  {move:<20} from {parent:>3}: H {c['H']}  "
        f"AP {c['AP']} at {c['resolution']}  GFLOPs {c['GFLOPs']}  teacher {r.teacher or 'none'}",
        flush=True,
    )


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
    path = [TrialRecord.from_trial(t) for t in lineage(study, best.number)]
    lines.append("lineage     " + " -> ".join(f"{t.move} (#{t.number})" for t in path))
    if len(study.directions) > 1:  # score.mode: pareto
        front = [(t.number, TrialRecord.from_trial(t).point()) for t in front_of(trials)]
        cells = [f"#{n} (AP {100 * p[0]:.1f}, cost {p[1]:.3f})" for n, p in front if p]
        lines.append(f"front       {len(front)} non-dominated: " + ", ".join(cells))
    strategy = study.user_attrs.get(STRATEGY_ATTR, "hill_climb")  # 0.1 studies: hill climbing
    lines.append(f"search      {strategy}, KD {kd_summary(study.user_attrs)}")
    return "\n".join(lines)
