"""What the report reads from a study's trials: best, base, running best, AP and FLOPs per trial,
the Pareto front, fig. 6's phases and action gains, and teacher capacity.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.errors import JDSearchError
from jdsearch.search.queries import StudyHandle, best_of, completed_trials, lineage_of, root_of
from jdsearch.search.record import BASE_MOVE, FINETUNE_MOVE, POOL_ATTR, TrialRecord, h_of
from jdsearch.search.strategies import family

__all__ = [
    "FAMILIES",
    "POOL_FAMILY",
    "TEACHER_FAMILY",
    "ActionGains",
    "ActionStep",
    "GainCell",
    "Phase",
    "action_family",
    "action_gains",
    "action_steps",
    "base_gflops",
    "base_trial",
    "best_trial",
    "completed",
    "failed_trials",
    "lineage_path",
    "parent_of",
    "pareto_front",
    "percent",
    "phase_windows",
    "require_completed",
    "running_best",
    "teacher_param_counter",
    "teacher_params",
    "trial_ap",
    "trial_gflops",
    "trial_h",
]

FAMILIES = ("channel_prune", "layer_prune", "add_layer", "rearrange", "teacher")
TEACHER_FAMILY = "teacher"
POOL_FAMILY = "pool"  # the pool strategy's student moves (pool.start, pool.depth3+, …)


# ---------------------------------------------------------------------- reading trials
completed = completed_trials  # COMPLETE trials with a finite H, by number


def failed_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The ``FAIL`` trials, by number."""
    return sorted((t for t in trials if t.state == TrialState.FAIL), key=lambda t: t.number)


def require_completed(trials: Sequence[FrozenTrial], what: str) -> list[FrozenTrial]:
    """The completed trials; :class:`JDSearchError` naming ``what`` when there is none."""
    done = completed(trials)
    if not done:
        raise JDSearchError(f"report: no completed trial to plot {what}")
    return done


def best_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial:
    """The completed trial with the highest H (the earlier one on a tie)."""
    best = best_of(trials)
    if best is None:
        raise JDSearchError("report: no completed trial to plot the best trial")
    return best


def base_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial:
    """The first completed ``base`` trial (the root: the base detector)."""
    root = root_of(trials)
    if root is None:
        raise JDSearchError("report: the trials hold no completed base trial (move 'base')")
    return root


def running_best(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """For each completed trial (by number), the best completed trial up to and including it."""
    out: list[FrozenTrial] = []
    best: FrozenTrial | None = None
    for t in completed(trials):
        if best is None or trial_h(t) > trial_h(best):
            best = t
        out.append(best)
    return out


def action_family(move: str | None) -> str | None:
    """The fig-6 family of a move: a student action family, ``teacher`` for every teacher
    mutation, ``pool`` for every student move of the pool strategy, ``None`` for the root
    (``base``), a post-search fine-tuning (not a step of the search) or a trial without a move."""
    if move is None or move in (BASE_MOVE, FINETUNE_MOVE):
        return None
    f = family(str(move))
    for grouped in (TEACHER_FAMILY, POOL_FAMILY):
        if f.startswith(grouped + "."):
            return grouped
    return f


def trial_h(t: FrozenTrial) -> float:
    """The trial's score H (its value, or the ``h_value`` attribute of a Pareto study's trial);
    NaN when not recorded."""
    h = h_of(t)
    return math.nan if h is None else h


def trial_ap(t: FrozenTrial) -> float:
    """COCO box AP (in [0, 1]) at the trial's best resolution (the score's metric when the full
    metrics were not recorded); NaN when not recorded."""
    r = TrialRecord.from_trial(t)
    value = r.metric_at(r.best_resolution)
    if value is None:
        value = r.ap.get(r.best_resolution or "")
    return math.nan if value is None else float(value)


def base_gflops(t: FrozenTrial) -> float:
    """GFLOPs at the base resolution (C(S) of the score H); NaN when not recorded."""
    flops = TrialRecord.from_trial(t).flops
    return math.nan if flops is None else float(flops) / 1e9


def trial_gflops(t: FrozenTrial) -> tuple[float, str | None]:
    """GFLOPs where the trial's AP is measured: ``(flops_at[best_resolution] / 1e9, resolution)``;
    ``(flops / 1e9, None)`` — at the base resolution — for a trial without that ``flops_at`` entry
    (studies recorded before it existed); NaN when neither is recorded."""
    flops, res = TrialRecord.from_trial(t).flops_where_scored()
    return (math.nan if flops is None else float(flops) / 1e9), res


def parent_of(t: FrozenTrial) -> int | None:
    """The trial number of ``t``'s parent, or ``None`` when none is recorded (the root)."""
    return TrialRecord.from_trial(t).parent


# ---------------------------------------------------------------------- Pareto front
def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials that no other completed trial dominates (AP ≥ and FLOPs ≤, one strictly),
    by ascending FLOPs — both as fig. 9 plots them (:func:`trial_ap`, :func:`trial_gflops`).
    Trials without a recorded AP or FLOPs take no part."""
    points = [(t, trial_ap(t), trial_gflops(t)[0]) for t in completed(trials)]
    points = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    points.sort(key=lambda p: (p[2], -p[1], p[0].number))
    front: list[FrozenTrial] = []
    best_cheaper = -math.inf  # the best AP of all strictly cheaper trials
    i = 0
    while i < len(points):
        flops = points[i][2]
        group = [p for p in points[i:] if p[2] == flops]
        top = group[0][1]  # sorted by AP descending inside a FLOPs value
        if top > best_cheaper:
            front += [t for t, ap, _ in group if ap == top]
            best_cheaper = top
        i += len(group)
    return front


# ---------------------------------------------------------------------- lineage
lineage_path = lineage_of  # root → trial following parent links


# ---------------------------------------------------------------------- actions and phases
@dataclass(frozen=True)
class Phase:
    """A window of consecutive completed trials (by number)."""

    index: int  # 0-based
    numbers: tuple[int, ...]  # the completed trials in it

    @property
    def first(self) -> int:
        """The window's first trial number."""
        return self.numbers[0]

    @property
    def last(self) -> int:
        """The window's last trial number."""
        return self.numbers[-1]

    @property
    def label(self) -> str:
        """``phase I (trials A–B)``, 1-based (``trial A`` for a window of one trial)."""
        span = (
            f"trial {self.first}" if self.first == self.last else f"trials {self.first}–{self.last}"
        )
        return f"phase {self.index + 1} ({span})"


def phase_windows(trials: Sequence[FrozenTrial], phases: int = 4) -> list[Phase]:
    """The completed trials split by trial number into ``phases`` windows of (nearly) equal size;
    fewer windows when there are fewer completed trials than ``phases``."""
    if isinstance(phases, bool) or not isinstance(phases, int) or phases < 1:
        raise JDSearchError(f"report: phases must be a positive integer, got {phases!r}")
    numbers = [t.number for t in completed(trials)]
    n = min(phases, len(numbers))
    out, start = [], 0
    for i in range(n):
        size = len(numbers) // n + (1 if i < len(numbers) % n else 0)
        out.append(Phase(i, tuple(numbers[start : start + size])))
        start += size
    return out


@dataclass(frozen=True)
class ActionStep:
    """One completed non-root trial: its move, family and score increment over its parent."""

    trial: int
    parent: int | None
    move: str
    family: str
    gain: float | None  # H(child) − H(parent); None when the parent is missing or not completed


def action_steps(trials: Sequence[FrozenTrial]) -> list[ActionStep]:
    """Every completed trial with a move other than ``base``, by trial number."""
    done = completed(trials)
    value = {t.number: trial_h(t) for t in done}
    steps = []
    for t in done:
        move = TrialRecord.from_trial(t).move
        fam = action_family(move)
        if fam is None:
            continue
        parent = parent_of(t)
        gain = value[t.number] - value[parent] if parent in value else None
        steps.append(ActionStep(t.number, parent, str(move), fam, gain))
    return steps


@dataclass
class GainCell:
    """One action family in one phase."""

    increment: float = 0.0  # summed increments of the beneficial actions: the score they brought
    beneficial: int = 0  # actions with H(child) > H(parent)
    scored: int = 0  # actions with a known increment (the parent completed)
    net: float = 0.0  # summed increments, harmful actions included
    unscored: int = 0  # completed, but the parent is missing or not completed
    failed: int = 0  # FAIL trials of this family


@dataclass(frozen=True)
class ActionGains:
    """Fig. 6's numbers, ``cells[(phase index, family)]``: per phase, the score increment each
    action family brought (top panel) and the family's share of the phase's beneficial actions
    (bottom panel). Families beyond :data:`FAMILIES` (``pool``, under the pool strategy) are
    listed after them."""

    phases: tuple[Phase, ...]
    families: tuple[str, ...]
    cells: Mapping[tuple[int, str], GainCell]

    def cell(self, phase: int, family_: str) -> GainCell:
        """The cell of family ``family_`` in phase ``phase``; an empty :class:`GainCell` when there
        is none."""
        return self.cells.get((phase, family_), GainCell())

    def beneficial_in(self, phase: int) -> int:
        """Beneficial actions of all families in the phase."""
        return sum(self.cell(phase, f).beneficial for f in self.families)

    def scored_in(self, phase: int) -> int:
        """Actions with a known increment, of all families, in the phase."""
        return sum(self.cell(phase, f).scored for f in self.families)

    def share(self, phase: int, family_: str) -> float | None:
        """The family's fraction of the phase's beneficial actions (the shares of a phase sum to
        1); ``None`` when the phase has no beneficial action."""
        total = self.beneficial_in(phase)
        return self.cell(phase, family_).beneficial / total if total else None

    def increment(self, family_: str) -> float:
        """The score increment the family's beneficial actions brought over the whole search."""
        return sum(self.cell(p.index, family_).increment for p in self.phases)


def action_gains(trials: Sequence[FrozenTrial], phases: int = 4) -> ActionGains:
    """Fig. 6's numbers: the completed non-root trials (:func:`action_steps`) and the failed ones
    counted per :func:`phase_windows` window (by trial number) and action family."""
    windows = phase_windows(trials, phases)
    firsts = [w.first for w in windows]
    cells: dict[tuple[int, str], GainCell] = {}

    def phase_of(number: int) -> int:
        return max(0, bisect_right(firsts, number) - 1)

    families = list(FAMILIES)
    for s in action_steps(trials):
        if s.family not in families:
            families.append(s.family)
        c = cells.setdefault((phase_of(s.trial), s.family), GainCell())
        if s.gain is None:
            c.unscored += 1
            continue
        c.scored += 1
        c.net += s.gain
        if s.gain > 0:
            c.beneficial += 1
            c.increment += s.gain
    if windows:  # failed trials count in the window their number falls in
        for t in failed_trials(trials):
            fam = action_family(TrialRecord.from_trial(t).move)
            if fam is None:
                continue
            if fam not in families:
                families.append(fam)
            cells.setdefault((phase_of(t.number), fam), GainCell()).failed += 1
    return ActionGains(tuple(windows), tuple(families), cells)


# ---------------------------------------------------------------------- teacher capacity
def teacher_params(
    trials: Sequence[FrozenTrial], count: Callable[[str], int] | None = None
) -> dict[int, int]:
    """Teacher backbone parameters per completed trial: the ``teacher_params`` attribute, else
    ``count(teacher config string)`` (studies written before the attribute existed)."""
    out = {}
    for t in completed(trials):
        r = TrialRecord.from_trial(t)
        value, cfg = r.teacher_params, r.teacher
        if value is None:
            if not cfg:
                raise JDSearchError(f"report: trial {t.number} records no teacher")
            if count is None:
                raise JDSearchError(
                    f"report: trial {t.number} has no teacher_params attribute and no pool to count {cfg}"
                )
            value = count(str(cfg))
        out[t.number] = int(value)
    return out


def teacher_param_counter(handle: StudyHandle) -> Callable[[str], int]:
    """``config string → teacher backbone parameters``, from the study's pool (loaded on first use,
    each config counted once)."""
    cache: dict[str, int] = {}
    holder: list[Any] = []

    def count(cfg: str) -> int:
        if cfg not in cache:
            from jdsearch.methods.pool import pool_from_bytes
            from jdsearch.spec.pool_space import SubnetConfig

            if not holder:
                source = f"study {handle.study.study_name!r}: pool"
                holder.append(pool_from_bytes(handle.study_artifact(POOL_ATTR), source=source))
            net = holder[0].extract(SubnetConfig.parse(cfg), device="cpu")
            cache[cfg] = sum(p.numel() for p in net.backbone.body.parameters())
        return cache[cfg]

    return count


def percent(v: float | None) -> str:
    """A COCO metric in [0, 1] as a percentage with one decimal; ``-`` when missing or not finite."""
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
