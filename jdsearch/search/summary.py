"""What a search prints: one line per finished trial, and base against best with the lineage."""

from __future__ import annotations

import optuna

from jdsearch.search.queries import best_of, lineage, root_of
from jdsearch.search.sampler import MOVE_PARAM, PARENT_ATTR


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    move = str(trial.params.get(MOVE_PARAM))
    if trial.state != optuna.trial.TrialState.COMPLETE:
        print(f"trial {trial.number:3d}  {move:<20} {trial.state.name}", flush=True)
        return
    c = summary_cells(trial)
    parent = trial.user_attrs.get(PARENT_ATTR)
    print(
        f"trial {trial.number:3d}  {move:<20} from {'-' if parent is None else parent:>3}: H {c['H']}  "
        f"AP {c['AP']} at {c['resolution']}  GFLOPs {c['GFLOPs']}  teacher {trial.user_attrs.get('teacher')}",
        flush=True,
    )


def summary_cells(t: optuna.trial.FrozenTrial) -> dict[str, str]:
    """H, and AP / GFLOPs / params at the resolution where the trial scored best."""
    a = t.user_attrs
    res = a.get("best_resolution", "")
    ap = a.get("metrics", {}).get(res, {}).get("AP")
    flops = a.get("flops_at", {}).get(
        res, a.get("flops", 0)
    )  # older trials: at the base resolution
    return {
        "H": f"{t.value:.4f}",
        "AP": "-" if ap is None else f"{100 * ap:.1f}",
        "GFLOPs": f"{flops / 1e9:.3f}",
        "params (M)": f"{a.get('params', 0) / 1e6:.3f}",
        "resolution": str(res),
    }


def summary(study: optuna.Study) -> str:
    """Base vs best student: H, AP, FLOPs, resolution, and the lineage path of moves."""
    trials = study.get_trials(deepcopy=False)
    root, best = root_of(trials), best_of(trials)
    if root is None or best is None:
        return "no completed trial yet"
    base, top = summary_cells(root), summary_cells(best)
    lines = [f"{'':<12}{f'base (trial {root.number})':<20}best (trial {best.number})"]
    lines += [f"{k:<12}{base[k]:<20}{top[k]}" for k in base]
    lines.append(f"student     {root.user_attrs.get('student', '')}")
    lines.append(f"        ->  {best.user_attrs.get('student', '')}")
    lines.append(
        f"teacher     {root.user_attrs.get('teacher', '')}  ->  {best.user_attrs.get('teacher', '')}"
    )
    path = lineage(study, best.number)
    lines.append(
        "lineage     " + " -> ".join(f"{t.params.get(MOVE_PARAM)} (#{t.number})" for t in path)
    )
    return "\n".join(lines)
