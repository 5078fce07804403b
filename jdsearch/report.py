"""Figures that explain a finished search (paper figs. 5–9 and table 4), as one offline HTML report.

Every figure is a plotly ``go.Figure`` built by a function of the study's trials (``FrozenTrial``
objects, failed ones included: they are skipped in the plots and counted where it helps), so each
can be tested on hand-made trials without a database:

========================  ==================================================================
key                       what it shows
========================  ==================================================================
``h_per_iteration``       fig. 8 — H of every sampled student per trial, one series per
                          evaluated resolution, and the best H so far
``pareto``                fig. 9 — AP against GFLOPs, both at the trial's best resolution, the
                          Pareto front (max AP, min FLOPs) as a step line, base and upgraded
                          trial marked
``teacher_capacity``      fig. 5 — backbone parameters of the best student's teacher over the
                          search (running best), and their distribution over all trials
``action_gain``           fig. 6 — per generation phase and action family: the score increment
                          the beneficial actions brought, and each family's share of the
                          phase's beneficial actions
``stage_flops``           fig. 7 — per-stage backbone GFLOPs (stem, stages 1–4), base vs upgraded
``lineage``               the search tree: trial → parent links, the base → upgraded path marked
========================  ==================================================================

The *upgraded* trial is the one the report is about: the best trial (highest H, the earlier trial
on a tie, as :meth:`jdsearch.search.StudyHandle.trial` picks it) unless ``trial=`` names another
completed one; figs. 7 and 9, the lineage path and the HTML summary all follow it.

FLOPs: the trial attribute ``flops`` is the student's multiply-adds at the study's *base*
resolution (the complexity C(S) of the score H; fig. 7 and the lineage hover use it); ``flops_at``
maps every evaluated resolution to the multiply-adds at that resolution. Fig. 9 and its Pareto
front pair AP at the trial's best resolution with ``flops_at`` at that same resolution; trials
recorded before ``flops_at`` existed fall back to ``flops`` (marked open in the plot and labelled
in the hover). AP is COCO box AP at the resolution where the trial scored best.

Fig. 6's *phases* (the paper's "generations"): the completed trials, ordered by trial number, are
split into ``phases`` windows of (nearly) equal count — trial numbers are the order the search
started its trials in. An action (a trial's move) is *beneficial*
when H(child) > H(parent); a child of a failed or missing parent has no increment and counts only
in the hover.

:func:`write_report` writes ``report.html`` (plotly.js embedded once, so the file works offline),
``figures/<key>.json`` and — when an image exporter (kaleido) works — ``figures/<key>.png``, and
attaches the figures to the study for optuna-dashboard under stable ids (``jdsearch-<key>``), so a
second report replaces the first.
"""

from __future__ import annotations

import html
import importlib.util
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from jdsearch.errors import JDSearchError
from jdsearch.sampler import BASE_MOVE, MOVE_PARAM, PARENT_ATTR, family
from jdsearch.search import best_of, completed_trials, lineage_of, root_of

if TYPE_CHECKING:
    from jdsearch.compare import Comparison
    from jdsearch.search import StudyHandle

__all__ = [
    "FAMILIES",
    "FIGURE_KEYS",
    "ActionGains",
    "ActionStep",
    "GainCell",
    "Phase",
    "ReportFiles",
    "action_family",
    "action_gains",
    "action_steps",
    "attach_figures",
    "base_trial",
    "best_trial",
    "build_figures",
    "completed",
    "fig_action_gain",
    "fig_h_per_iteration",
    "fig_lineage",
    "fig_pareto",
    "fig_stage_flops",
    "fig_teacher_capacity",
    "graph_object_id",
    "lineage_path",
    "pareto_front",
    "phase_windows",
    "running_best",
    "teacher_param_counter",
    "teacher_params",
    "trial_ap",
    "trial_gflops",
    "upgraded_trial",
    "write_report",
]

FIGURE_KEYS = (
    "h_per_iteration",
    "pareto",
    "teacher_capacity",
    "action_gain",
    "stage_flops",
    "lineage",
)
FAMILIES = ("channel_prune", "layer_prune", "add_layer", "rearrange", "teacher")
TEACHER_FAMILY = "teacher"
_COLOURS = {
    "base": "#444444",
    "channel_prune": "#1f77b4",
    "layer_prune": "#ff7f0e",
    "add_layer": "#2ca02c",
    "rearrange": "#9467bd",
    "teacher": "#d62728",
}
_GRAPH_ID_PREFIX = "jdsearch-"


# ---------------------------------------------------------------------- reading trials
completed = completed_trials  # COMPLETE trials with a finite H, by number


def _failed(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return sorted((t for t in trials if t.state == TrialState.FAIL), key=lambda t: t.number)


def _require(trials: Sequence[FrozenTrial], what: str) -> list[FrozenTrial]:
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
        if best is None or float(t.value) > float(best.value):  # type: ignore[arg-type]
            best = t
        out.append(best)
    return out


def action_family(move: str | None) -> str | None:
    """The fig-6 family of a move: a student action family, ``teacher`` for every teacher
    mutation, ``None`` for the root (``base``) or a trial without a move."""
    if move is None or move == BASE_MOVE:
        return None
    f = family(str(move))
    return TEACHER_FAMILY if f.startswith(TEACHER_FAMILY) else f


def trial_ap(t: FrozenTrial) -> float:
    """COCO box AP (in [0, 1]) at the trial's best resolution; NaN when not recorded."""
    a = t.user_attrs
    res = a.get("best_resolution")
    value = a.get("metrics", {}).get(res, {}).get("AP")
    if value is None:
        value = a.get("ap", {}).get(res)
    return math.nan if value is None else float(value)


def _gflops(t: FrozenTrial) -> float:
    """GFLOPs at the base resolution (the ``flops`` attribute); NaN when not recorded."""
    flops = t.user_attrs.get("flops")
    return math.nan if flops is None else float(flops) / 1e9


def trial_gflops(t: FrozenTrial) -> tuple[float, str | None]:
    """GFLOPs where the trial's AP is measured: ``(flops_at[best_resolution] / 1e9, resolution)``;
    ``(flops / 1e9, None)`` — at the base resolution — for a trial without that ``flops_at`` entry
    (studies recorded before it existed); NaN when neither is recorded."""
    a = t.user_attrs
    res = a.get("best_resolution")
    at = a.get("flops_at")
    if isinstance(at, Mapping) and res is not None and at.get(res) is not None:
        return float(at[res]) / 1e9, str(res)
    return _gflops(t), None


def _parent(t: FrozenTrial) -> int | None:
    p = t.user_attrs.get(PARENT_ATTR)
    return None if p is None else int(p)


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
        return self.numbers[0]

    @property
    def last(self) -> int:
        return self.numbers[-1]

    @property
    def label(self) -> str:
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
    value = {t.number: float(t.value) for t in done}  # type: ignore[arg-type]
    steps = []
    for t in done:
        move = t.params.get(MOVE_PARAM)
        fam = action_family(move)
        if fam is None:
            continue
        parent = _parent(t)
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
    (bottom panel). Families beyond :data:`FAMILIES` (none today) are listed after them."""

    phases: tuple[Phase, ...]
    families: tuple[str, ...]
    cells: Mapping[tuple[int, str], GainCell]

    def cell(self, phase: int, family_: str) -> GainCell:
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
        for t in _failed(trials):
            fam = action_family(t.params.get(MOVE_PARAM))
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
        value = t.user_attrs.get("teacher_params")
        if value is None:
            cfg = t.user_attrs.get("teacher")
            if cfg is None:
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
            from jdsearch.pool import SubnetConfig, pool_from_bytes

            if not holder:
                source = f"study {handle.study.study_name!r}: pool"
                holder.append(
                    pool_from_bytes(handle.study_artifact("pool_artifact"), source=source)
                )
            net = holder[0].extract(SubnetConfig.parse(cfg), device="cpu")
            cache[cfg] = sum(p.numel() for p in net.backbone.body.parameters())
        return cache[cfg]

    return count


# ---------------------------------------------------------------------- hover text
def _wrap_student(encoding: str, blocks_per_line: int = 6) -> str:
    lines = []
    for stage in re.split(r"(?<=\]),\s*(?=\[)", encoding):
        blocks = re.split(r"(?<=\))-(?=\()", stage)
        for i in range(0, len(blocks), blocks_per_line):
            chunk = "-".join(blocks[i : i + blocks_per_line])
            lines.append(chunk + ("-" if i + blocks_per_line < len(blocks) else ""))
    return "<br>  ".join(lines)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}" if math.isfinite(v) else "-"


def _hover(t: FrozenTrial) -> str:
    a = t.user_attrs
    parent = _parent(t)
    origin = "" if parent is None else f" from {parent}"
    res = a.get("best_resolution", "?")
    g, at = trial_gflops(t)
    flops = (
        f"GFLOPs {g:.3f} at {at} ({_gflops(t):.3f} at the base resolution)"
        if at is not None
        else f"GFLOPs {g:.3f} at the base resolution (no flops_at recorded)"
    )
    parts = [
        f"<b>trial {t.number}</b>: {t.params.get(MOVE_PARAM, '?')}{origin}",
        f"H {float(t.value):.4f} at {res}",  # type: ignore[arg-type]
        f"AP {_pct(trial_ap(t))} at {res}",
        flops,
        f"teacher {a.get('teacher', '?')}",
        f"student {_wrap_student(str(a.get('student', '?')))}",
    ]
    return "<br>".join(parts)


def _resolution_order(keys: set[str]) -> list[str]:
    from jdsearch.resolution import Resolution

    def key(text: str) -> tuple[int, str]:
        try:
            return (Resolution.parse(text).pixels, text)
        except JDSearchError:
            return (0, text)

    return sorted(keys, key=key)


def _upgraded_label(trials: Sequence[FrozenTrial], number: int) -> str:
    best = best_of(trials)
    return (
        f"trial {number}, best H"
        if best is not None and best.number == number
        else f"trial {number}"
    )


def _completed_trial(trials: Sequence[FrozenTrial], number: int | None) -> FrozenTrial:
    """The best completed trial, or completed trial ``number``."""
    if number is None:
        return best_trial(trials)
    if isinstance(number, bool) or not isinstance(number, int):
        raise JDSearchError(f"report: trial must be a trial number, got {number!r}")
    match = next((t for t in completed(trials) if t.number == number), None)
    if match is None:
        raise JDSearchError(f"report: trial {number} is not a completed trial")
    return match


# ---------------------------------------------------------------------- figures
def fig_h_per_iteration(trials: Sequence[FrozenTrial]) -> go.Figure:
    """Fig. 8: H of the sampled students per trial, one series per resolution, and the best so far."""
    done = _require(trials, "H per iteration")
    resolutions = _resolution_order({r for t in done for r in t.user_attrs.get("h", {})})
    fig = go.Figure()
    for res in resolutions:
        pts = [
            (t.number, float(t.user_attrs["h"][res]))
            for t in done
            if res in t.user_attrs.get("h", {})
        ]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                mode="markers",
                name=f"H at {res}",
                customdata=[p[0] for p in pts],
                hovertemplate=f"trial %{{x}}<br>H at {res}: %{{y:.4f}}<extra></extra>",
            )
        )
    best = running_best(done)
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in done],
            y=[float(b.value) for b in best],
            mode="lines",
            line_shape="hv",  # type: ignore[arg-type]
            name="best H so far",
            line={"color": "black", "width": 2},
            customdata=[b.number for b in best],
            hovertemplate="trial %{x}: best H %{y:.4f} (trial %{customdata})<extra></extra>",
        )
    )
    n_failed = len(_failed(trials))
    fig.update_layout(
        title=f"H of sampled students per iteration ({len(done)} completed, {n_failed} failed trials)",
        xaxis_title="iteration (trial number)",
        yaxis_title="H",
        hovermode="closest",
    )
    return fig


def fig_pareto(trials: Sequence[FrozenTrial], *, best: int | None = None) -> go.Figure:
    """Fig. 9: AP against GFLOPs — both at the trial's best resolution (:func:`trial_ap`,
    :func:`trial_gflops`) — of every completed trial, the Pareto front as a step line, the base
    trial and the upgraded trial (the best, or trial ``best``) marked. Trials whose FLOPs fall back
    to the base resolution (no ``flops_at``) are drawn as open circles."""
    done = [
        t
        for t in _require(trials, "the Pareto front")
        if math.isfinite(trial_ap(t)) and math.isfinite(trial_gflops(t)[0])
    ]
    if not done:
        raise JDSearchError("report: no completed trial records both AP and FLOPs")
    top = _completed_trial(trials, best)
    if top.number not in {t.number for t in done}:
        raise JDSearchError(
            f"report: trial {top.number} records no AP or FLOPs to mark in the AP–FLOPs plot"
        )
    front = pareto_front(done)
    fig = go.Figure()

    def scatter(ts: Sequence[FrozenTrial], **kw: Any) -> go.Scatter:
        return go.Scatter(
            x=[trial_gflops(t)[0] for t in ts],
            y=[100 * trial_ap(t) for t in ts],
            customdata=[t.number for t in ts],
            text=[_hover(t) for t in ts],
            hovertemplate="%{text}<extra></extra>",
            **kw,
        )

    at_best = [trial_gflops(t)[1] is not None for t in done]
    fig.add_trace(
        scatter(
            done,
            mode="markers",
            name="trials",
            marker={
                "color": "#8c9fb8",
                "size": 7,
                "symbol": ["circle" if ok else "circle-open" for ok in at_best],
            },
        )
    )
    fig.add_trace(
        scatter(
            front,
            mode="lines+markers",
            line_shape="hv",
            name="Pareto front",
            line={"color": "#d62728", "width": 2},
            marker={"color": "#d62728", "size": 9},
        )
    )
    roots = [t for t in done if t.params.get(MOVE_PARAM) == BASE_MOVE]
    if roots:
        fig.add_trace(
            scatter(
                roots[:1],
                mode="markers",
                name=f"base (trial {roots[0].number})",
                marker={"symbol": "square", "size": 13, "color": "#444444"},
            )
        )
    fig.add_trace(
        scatter(
            [top],
            mode="markers",
            name=f"upgraded ({_upgraded_label(trials, top.number)})",
            marker={
                "symbol": "star",
                "size": 17,
                "color": "#ffbf00",
                "line": {"color": "black", "width": 1},
            },
        )
    )
    if all(at_best):
        x_title = "GFLOPs (multiply-adds at the trial's best resolution)"
    elif any(at_best):
        x_title = (
            "GFLOPs (multiply-adds at the trial's best resolution; "
            "open circles: at the base resolution, no flops_at recorded)"
        )
    else:
        x_title = "GFLOPs (multiply-adds at the base resolution: these trials record no flops_at)"
    fig.update_layout(
        title="AP vs complexity of every completed trial, with the Pareto front",
        xaxis_title=x_title,
        yaxis_title="AP (%) at the trial's best resolution",
    )
    return fig


def fig_teacher_capacity(
    trials: Sequence[FrozenTrial], *, count: Callable[[str], int] | None = None
) -> go.Figure:
    """Fig. 5: left, the backbone parameters of the best student's teacher so far; right, their
    distribution over all completed trials. ``count`` counts a teacher config that lacks the
    ``teacher_params`` attribute."""
    done = _require(trials, "teacher capacity")
    params = teacher_params(done, count)
    best = running_best(done)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        subplot_titles=("teacher of the best student so far", "teachers over all trials"),
    )
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in done],
            y=[params[t.number] / 1e6 for t in done],
            mode="markers",
            name="sampled teacher",
            marker={"color": "#bbbbbb", "size": 6},
            customdata=[t.number for t in done],
            text=[str(t.user_attrs.get("teacher", "?")) for t in done],
            hovertemplate="trial %{x}: %{text}<br>%{y:.3f} M<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in done],
            y=[params[b.number] / 1e6 for b in best],
            mode="lines+markers",
            line_shape="hv",
            name="best student's teacher",
            line={"color": "#d62728", "width": 2},
            customdata=[b.number for b in best],
            text=[str(b.user_attrs.get("teacher", "?")) for b in best],
            hovertemplate="trial %{x}: best is trial %{customdata}<br>teacher %{text}<br>%{y:.3f} M<extra></extra>",
        ),
        row=1,
        col=1,
    )
    values = [params[t.number] / 1e6 for t in done]
    fig.add_trace(
        go.Histogram(
            x=values,
            name="all teachers",
            marker={"color": "#1f77b4"},
            nbinsx=min(30, max(1, len(set(values)))),
            hovertemplate="%{x} M: %{y} trials<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="iteration (trial number)", row=1, col=1)
    fig.update_yaxes(title_text="teacher backbone params (M)", row=1, col=1)
    fig.update_xaxes(title_text="teacher backbone params (M)", row=1, col=2)
    fig.update_yaxes(title_text="trials", row=1, col=2)
    fig.update_layout(title="Teacher–student capacity matching", bargap=0.05)
    return fig


def fig_action_gain(trials: Sequence[FrozenTrial], *, phases: int = 4) -> go.Figure:
    """Fig. 6 over :func:`action_gains`' generation phases. Top: the score increment each action
    family brought (summed positive H(child) − H(parent)), stacked per phase. Bottom: each family's
    share of the phase's beneficial actions, stacked to 100 %; a phase without a beneficial action
    has no bar, only a note saying so."""
    _require(trials, "the action analysis")
    gains = action_gains(trials, phases)
    labels = [p.label for p in gains.phases]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.12,
        subplot_titles=(
            "score increment brought by each action family (sum of H(child) − H(parent) > 0)",
            "each family's share of the phase's beneficial actions (H(child) > H(parent))",
        ),
    )
    for fam in gains.families:
        cells = [gains.cell(p.index, fam) for p in gains.phases]
        info = [
            f"{c.beneficial} beneficial of {c.scored} scored actions (net ΔH {c.net:+.4f}); "
            f"{c.unscored} without a completed parent, {c.failed} failed"
            for c in cells
        ]
        colour = _COLOURS.get(fam, "#7f7f7f")
        total = gains.increment(fam)
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[c.increment for c in cells],
                name=fam,
                legendgroup=fam,
                marker_color=colour,
                text=info,
                textposition="none",
                hovertemplate=f"{fam}, %{{x}}<br>ΔH brought %{{y:.4f}} (whole search {total:.4f})<br>%{{text}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        shares = [gains.share(p.index, fam) for p in gains.phases]
        share_info = [
            f"{c.beneficial} of the phase's {gains.beneficial_in(p.index)} beneficial actions"
            for c, p in zip(cells, gains.phases, strict=True)
        ]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[None if v is None else 100 * v for v in shares],
                name=fam,
                legendgroup=fam,
                marker_color=colour,
                showlegend=False,
                text=share_info,
                textposition="none",
                hovertemplate=f"{fam}, %{{x}}<br>%{{y:.1f}} % of the beneficial actions<br>%{{text}}<extra></extra>",
            ),
            row=2,
            col=1,
        )
    for p in gains.phases:
        if gains.beneficial_in(p.index) == 0:
            fig.add_annotation(
                x=p.label,
                y=50,
                xref="x2",
                yref="y2",
                showarrow=False,
                text="no beneficial action",
                hovertext=f"{p.label}: none of its {gains.scored_in(p.index)} scored actions improved on its parent",
                font={"color": "#666666"},
            )
    fig.update_xaxes(categoryorder="array", categoryarray=labels)
    fig.update_xaxes(
        title_text="generation phase (equal windows of completed trials, by trial number)",
        row=2,
        col=1,
    )
    fig.update_yaxes(title_text="ΔH brought", row=1, col=1)
    fig.update_yaxes(title_text="share of beneficial actions (%)", range=[0, 100], row=2, col=1)
    fig.update_layout(
        title="What each action family contributed, phase by phase", barmode="stack", height=640
    )
    return fig


def fig_stage_flops(trials: Sequence[FrozenTrial], *, best: int | None = None) -> go.Figure:
    """Fig. 7: per-stage backbone GFLOPs (stem, stages 1–4) at the base resolution of the base trial
    and the upgraded student (the best, or trial ``best``), with the relative change on the
    student's bars."""
    base = base_trial(trials)
    top = _completed_trial(trials, best)
    label = _upgraded_label(trials, top.number)
    stages = []
    for t in (base, top):
        s = t.user_attrs.get("stage_flops")
        if not s:
            raise JDSearchError(f"report: trial {t.number} records no stage_flops")
        stages.append([float(v) / 1e9 for v in s])
    if len(stages[0]) != len(stages[1]):
        raise JDSearchError(
            f"report: trials {base.number} and {top.number} record different numbers of stages"
        )
    labels = ["stem"] + [f"stage {i}" for i in range(1, len(stages[0]))]
    change = [f"{100 * (n / b - 1):+.1f}%" if b else "n/a" for b, n in zip(*stages, strict=True)]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=labels,
            y=stages[0],
            name=f"base (trial {base.number})",
            marker_color="#8c9fb8",
            hovertemplate="%{x}: %{y:.4f} GFLOPs<extra></extra>",
        )
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=stages[1],
            name=f"upgraded student ({label})",
            marker_color="#d62728",
            text=change,
            textposition="outside",
            hovertemplate="%{x}: %{y:.4f} GFLOPs (%{text})<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Backbone computation per stage: base (trial {base.number}) vs upgraded student ({label})",
        barmode="group",
        xaxis_title="backbone part",
        yaxis_title="GFLOPs (at the base resolution)",
    )
    return fig


def fig_lineage(trials: Sequence[FrozenTrial], *, best: int | None = None) -> go.Figure:
    """The search tree: a node per completed trial (x trial number, y H), an edge from each parent,
    the path from the root to the upgraded trial (the best, or trial ``best``) highlighted."""
    done = _require(trials, "the lineage tree")
    by_number = {t.number: t for t in done}
    target = _completed_trial(done, best).number
    ex: list[float | None] = []
    ey: list[float | None] = []
    for t in done:
        p = _parent(t)
        if p in by_number:
            ex += [p, t.number, None]
            ey += [float(by_number[p].value), float(t.value), None]  # type: ignore[arg-type]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=ex,
            y=ey,
            mode="lines",
            name="parent → child",
            line={"color": "#cccccc", "width": 1},
            hoverinfo="skip",
        )
    )
    path = [t for t in lineage_path(trials, target) if t.number in by_number]
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in path],
            y=[float(t.value) for t in path],
            mode="lines",  # type: ignore[arg-type]
            name=f"path to trial {target}",
            line={"color": "#ffbf00", "width": 5},
            customdata=[t.number for t in path],
            hoverinfo="skip",
        )
    )
    groups: dict[str, list[FrozenTrial]] = {}
    for t in done:
        groups.setdefault(action_family(t.params.get(MOVE_PARAM)) or "base", []).append(t)
    for fam in ["base", *FAMILIES, *sorted(set(groups) - {"base", *FAMILIES})]:
        ts = groups.get(fam)
        if not ts:
            continue
        on_path = {t.number for t in path}
        fig.add_trace(
            go.Scatter(
                x=[t.number for t in ts],
                y=[float(t.value) for t in ts],
                mode="markers",
                name=fam,  # type: ignore[arg-type]
                marker={
                    "color": _COLOURS.get(fam, "#7f7f7f"),
                    "size": [13 if t.number in on_path else 8 for t in ts],
                    "line": {
                        "color": "black",
                        "width": [2 if t.number in on_path else 0 for t in ts],
                    },
                },
                customdata=[t.number for t in ts],
                text=[_hover(t) for t in ts],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"Search lineage: {len(done)} completed trials, path base → upgraded ({_upgraded_label(done, target)}) highlighted",
        xaxis_title="trial number",
        yaxis_title="H",
        hovermode="closest",
    )
    return fig


# ---------------------------------------------------------------------- the study report
def upgraded_trial(handle: StudyHandle, trial: int | None = None) -> FrozenTrial:
    """The trial a report is about: ``handle.trial(trial)`` (default: the best), which must be a
    completed trial with a finite H."""
    if trial is not None and (isinstance(trial, bool) or not isinstance(trial, int)):
        raise JDSearchError(f"report: trial must be a trial number, got {trial!r}")
    t = handle.trial(trial)
    if t.number not in {c.number for c in completed(handle.study.get_trials(deepcopy=False))}:
        raise JDSearchError(
            f"study {handle.study.study_name!r}: trial {t.number} has no finite score H"
        )
    return t


def build_figures(
    handle: StudyHandle, *, trial: int | None = None, phases: int = 4
) -> dict[str, go.Figure]:
    """Every figure of the report for a study, keyed by :data:`FIGURE_KEYS` (in that order); figs.
    7 and 9 and the lineage path show trial ``trial`` (default: the best) as the upgraded one."""
    trials = handle.study.get_trials(deepcopy=False)
    if not completed(trials):
        raise JDSearchError(f"study {handle.study.study_name!r} has no completed trial yet")
    phase_windows(trials, phases)  # validates phases before any work
    top = upgraded_trial(handle, trial).number
    count = teacher_param_counter(handle)
    figures = {
        "h_per_iteration": fig_h_per_iteration(trials),
        "pareto": fig_pareto(trials, best=top),
        "teacher_capacity": fig_teacher_capacity(trials, count=count),
        "action_gain": fig_action_gain(trials, phases=phases),
        "stage_flops": fig_stage_flops(trials, best=top),
        "lineage": fig_lineage(trials, best=top),
    }
    assert tuple(figures) == FIGURE_KEYS
    return figures


def graph_object_id(key: str) -> str:
    """The optuna-dashboard id a figure is attached under (stable, so a new report overwrites)."""
    return _GRAPH_ID_PREFIX + key


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    html: Path
    figures: dict[str, Path]  # key → figures/<key>.json
    png: dict[str, Path] = field(default_factory=dict)  # key → figures/<key>.png (when exported)
    png_skipped: str | None = None  # why no PNG was written (None: all written)
    attached: tuple[str, ...] = ()  # optuna-dashboard graph object ids


_TEXT = {
    "h_per_iteration": (
        "H score throughout the search (paper fig. 8)",
        "The score H of every sampled student, one marker per trial and evaluated input resolution, "
        "and the best H found so far. In the paper the best score climbs steadily for every base "
        "detector: because each child inherits its parent's weights, the search keeps improving the "
        "performance–complexity trade-off instead of restarting from scratch.",
    ),
    "pareto": (
        "AP vs complexity and the Pareto front (paper fig. 9)",
        "Each trial at its best-scoring input resolution: AP against the multiply-adds at that same "
        "resolution (trials recorded without per-resolution FLOPs fall back to the base resolution, "
        "drawn as open circles). The step line joins the Pareto-optimal trials — none has both "
        "lower FLOPs and higher AP; the star is the upgraded student ({upgraded}). The paper compares "
        "such fronts across base detectors and finds a larger base detector usually reaches the "
        "better front, as it can be reshaped more freely.",
    ),
    "teacher_capacity": (
        "Teacher–student capacity matching (paper fig. 5)",
        "Left: backbone parameters of the teacher paired with the best student so far; grey markers "
        "are the teachers sampled at each trial. Right: how often each teacher size was used. The paper "
        "finds that dynamic distillation settles on a teacher whose capacity matches the student's: "
        "smaller students converge to smaller teachers, larger ones to larger teachers.",
    ),
    "action_gain": (
        "Contribution of each action (paper fig. 6)",
        "Generations: the completed trials, ordered by trial number (the order the search started "
        "them in), are split into {phases} phases of (nearly) equal count. An action is beneficial "
        "when the child scores higher than its parent, H(child) > H(parent). Top: the score increment "
        "each action family brought in each phase — the increments of its beneficial actions, summed "
        "and stacked. Bottom: each family's share of the phase's beneficial actions, stacked to 100 %; "
        "a phase without any beneficial action has no bar. Harmful actions, failed trials and children "
        "of a failed or missing parent appear in the hover counts only. In the paper channel pruning "
        "contributes most of the increment and dominates early phases, while add-layer, layer pruning "
        "and rearranging make finer per-stage adjustments later.",
    ),
    "stage_flops": (
        "Computation allocation of the backbone (paper fig. 7)",
        "Multiply-adds (at the base resolution) of the stem and of each backbone stage for the base "
        "detector and the upgraded student ({upgraded}), with the relative change on the student's bars. For ResNet backbones the paper "
        "finds the largest reduction at stage 3, then stage 2 and stage 1 — the redundancy of "
        "hand-designed ResNets sits mostly in the middle stages.",
    ),
    "lineage": (
        "Search lineage",
        "Every completed trial as a node (trial number, H), linked to the parent it was derived from, "
        "coloured by action family. The highlighted path is the chain of moves from the base detector "
        "to the upgraded student ({upgraded}); hover a node for its move, student encoding, teacher, "
        "AP and GFLOPs.",
    ),
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
p { line-height: 1.45; } .summary { color: #444; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr:last-child td { font-weight: 600; background: #f6f6f6; }
.note { color: #666; font-size: 0.9em; margin: 0.2em 0; }
.figure { margin: 0.5em 0 1.5em 0; }
"""


def _render(text: str, **values: str) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def _flops_phrase(t: FrozenTrial) -> str:
    g, at = trial_gflops(t)
    if at is not None:
        return f"{g:.3f} GFLOPs at {html.escape(at)} ({_gflops(t):.3f} at the base resolution)"
    return f"{g:.3f} GFLOPs at the base resolution"


def _summary(handle: StudyHandle, trials: Sequence[FrozenTrial], upgraded: FrozenTrial) -> str:
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    attrs = handle.study.user_attrs
    best = best_trial(trials)
    score = handle.spec.score
    base_res = html.escape(str(attrs.get("base_resolution", "?")))
    if upgraded.number == best.number:
        which = "the best H"
    else:
        which = (
            f"chosen for this report; the best H is trial {best.number}, H {float(best.value):.4f}"  # type: ignore[arg-type]
        )
    parts = [
        f"{len(trials)} trials ({counts}).",
        f"Base resolution {base_res}, base detector "
        f"{float(attrs.get('base_flops', math.nan)) / 1e9:.3f} GFLOPs at {base_res}.",
        f"Score H = {html.escape(score.metric)} × [(C/C<sub>base</sub>)·(R/R<sub>base</sub>)<sup>{score.beta:g}</sup>]"
        f"<sup>−{score.alpha:g}</sup>.",
        f"Upgraded detector: trial {upgraded.number} ({which}), "
        f"H {float(upgraded.value):.4f} ({html.escape(str(upgraded.params.get(MOVE_PARAM)))}), "  # type: ignore[arg-type]
        f"AP {_pct(trial_ap(upgraded))} at {html.escape(str(upgraded.user_attrs.get('best_resolution', '?')))}, "
        f"{_flops_phrase(upgraded)}.",
    ]
    return " ".join(parts)


def _comparison_html(comparison: Comparison) -> str:
    header, rows = comparison.table()
    out = [
        '<table class="comparison">',
        "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
    ]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</table>")
    notes = comparison.format().splitlines()[1 + len(rows) :]
    out += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    return "\n".join(out)


def _png_exporter_missing() -> str | None:
    if importlib.util.find_spec("kaleido") is None:
        return "no image exporter: kaleido is not installed"
    return None


def _write_pngs(
    figures: Mapping[str, go.Figure], directory: Path
) -> tuple[dict[str, Path], str | None]:
    missing = _png_exporter_missing()
    if missing is not None:
        return {}, missing
    written: dict[str, Path] = {}
    for key, fig in figures.items():
        path = directory / f"{key}.png"
        try:
            fig.write_image(str(path))
        except Exception as e:  # kaleido without a browser, a broken install…: report, don't fail
            path.unlink(missing_ok=True)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return written, f"image export failed at {key}: {type(e).__name__}: {first}"
        written[key] = path
    return written, None


def attach_figures(handle: StudyHandle, figures: Mapping[str, go.Figure]) -> tuple[str, ...]:
    """Save the figures in the study for optuna-dashboard, under :func:`graph_object_id` ids."""
    from optuna_dashboard import save_plotly_graph_object

    return tuple(
        save_plotly_graph_object(handle.study, fig, graph_object_id=graph_object_id(key))
        for key, fig in figures.items()
    )


def write_report(
    handle: StudyHandle,
    out_dir: str | Path,
    *,
    trial: int | None = None,
    comparison: Comparison | None = None,
    png: bool = True,
    attach: bool = True,
    phases: int = 4,
) -> ReportFiles:
    """Write ``out_dir/report.html`` (self-contained), ``out_dir/figures/<key>.json`` and, when
    ``png`` and an exporter works, ``<key>.png``; with ``attach`` also save the figures in the
    study for optuna-dashboard. ``trial`` is the upgraded trial the summary and figs. 7 and 9 and
    the lineage path show (default: the best). ``comparison`` (from
    :func:`jdsearch.compare.compare_study`, for the same study and trial) adds the table-4
    comparison."""
    from plotly.offline import get_plotlyjs

    from jdsearch.compare import Comparison

    if comparison is not None and not isinstance(comparison, Comparison):
        raise JDSearchError(
            f"report: comparison must be a jdsearch.compare.Comparison, got {type(comparison).__name__}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise JDSearchError(f"report: output directory {out} exists and is not a directory")
    upgraded = upgraded_trial(handle, trial)
    if comparison is not None:
        if comparison.study != handle.study.study_name:
            raise JDSearchError(
                f"report: the comparison is of study {comparison.study!r}, not {handle.study.study_name!r}"
            )
        if comparison.upgraded.trial != upgraded.number:
            raise JDSearchError(
                f"report: the comparison's upgraded detector is trial {comparison.upgraded.trial}, "
                f"but the report is about trial {upgraded.number}"
            )
    figures = build_figures(handle, trial=upgraded.number, phases=phases)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    json_paths = {}
    for key, fig in figures.items():
        path = fig_dir / f"{key}.json"
        path.write_text(fig.to_json(), encoding="utf-8")
        json_paths[key] = path
    if png:
        png_paths, png_skipped = _write_pngs(figures, fig_dir)
    else:
        png_paths, png_skipped = {}, "PNG export not requested"

    name = html.escape(handle.study.study_name)
    trials = handle.study.get_trials(deepcopy=False)
    body = [
        f"<h1>Joint-DetNAS search report: {name}</h1>",
        f'<p class="summary">{_summary(handle, trials, upgraded)}</p>',
    ]
    if comparison is not None:
        body += [
            "<h2>Base vs upgraded detector (paper table 4)</h2>",
            "<p>The base trial and the upgraded student, each at its own input size, with the metrics "
            "the search recorded on the study's validation set. The paper's table 4 reports the same "
            "columns for R18/R50/R101/X101-FPN: higher AP at substantially lower FLOPs and latency.</p>",
            _comparison_html(comparison),
        ]
    body.append(
        "<nav><p>Figures: "
        + " · ".join(f'<a href="#sec-{key}">{html.escape(_TEXT[key][0])}</a>' for key in figures)
        + "</p></nav>"
    )
    fill = {
        "upgraded": _upgraded_label(trials, upgraded.number),
        "phases": str(len(phase_windows(trials, phases))),
    }
    for key, fig in figures.items():
        title, text = _TEXT[key]
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{key}",
            default_height="560px" if key != "action_gain" else "660px",
            config={"responsive": True},
        )
        text = _render(text, **fill)
        body += [
            f'<h2 id="sec-{key}">{html.escape(title)}</h2>',
            f"<p>{html.escape(text)}</p>",
            f'<div class="figure">{div}</div>',
        ]
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>jdsearch report: {name}</title>",
            f"<style>{_STYLE}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    attached = attach_figures(handle, figures) if attach else ()
    return ReportFiles(html_path, json_paths, png_paths, png_skipped, attached)
