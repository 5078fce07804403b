"""The figures that explain a finished search (paper figs. 5–9 and the lineage), each a plotly
figure built from the study's trials, so each is tested on hand-made trials. What each shows:
``docs/search.md``, "Reading a search".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

from jdsearch.core.errors import JDSearchError
from jdsearch.report.trials import (
    FAMILIES,
    ActionGains,
    action_family,
    action_gains,
    base_gflops,
    base_trial,
    best_trial,
    completed,
    failed_trials,
    lineage_path,
    parent_of,
    pareto_front,
    percent,
    phase_windows,
    require_completed,
    running_best,
    teacher_param_counter,
    teacher_params,
    trial_ap,
    trial_gflops,
    trial_h,
)
from jdsearch.search.queries import StudyHandle, best_of, front_of
from jdsearch.search.record import BASE_MOVE, TrialRecord

__all__ = [
    "FIGURE_KEYS",
    "build_figures",
    "fig_action_gain",
    "fig_cost_front",
    "fig_h_per_iteration",
    "fig_lineage",
    "fig_pareto",
    "fig_stage_flops",
    "fig_teacher_capacity",
    "graph_object_id",
    "upgraded_label",
    "upgraded_trial",
]

FIGURE_KEYS = (
    "h_per_iteration",
    "pareto",
    "teacher_capacity",
    "action_gain",
    "stage_flops",
    "lineage",
)
_COLOURS = {
    "base": "#444444",
    "channel_prune": "#1f77b4",
    "layer_prune": "#ff7f0e",
    "add_layer": "#2ca02c",
    "rearrange": "#9467bd",
    "teacher": "#d62728",
}
_GRAPH_ID_PREFIX = "jdsearch-"


# ---------------------------------------------------------------------- hover text
def _wrap_student(encoding: str, blocks_per_line: int = 6) -> str:
    lines = []
    for stage in re.split(r"(?<=\]),\s*(?=\[)", encoding):
        blocks = re.split(r"(?<=\))-(?=\()", stage)
        for i in range(0, len(blocks), blocks_per_line):
            chunk = "-".join(blocks[i : i + blocks_per_line])
            lines.append(chunk + ("-" if i + blocks_per_line < len(blocks) else ""))
    return "<br>  ".join(lines)


def _hover(t: FrozenTrial) -> str:
    r = TrialRecord.from_trial(t)
    origin = "" if r.parent is None else f" from {r.parent}"
    res = r.best_resolution or "?"
    g, at = trial_gflops(t)
    flops = (
        f"GFLOPs {g:.3f} at {at} ({base_gflops(t):.3f} at the base resolution)"
        if at is not None
        else f"GFLOPs {g:.3f} at the base resolution (no flops_at recorded)"
    )
    parts = [
        f"<b>trial {t.number}</b>: {r.move or '?'}{origin}",
        f"H {trial_h(t):.4f} at {res}",
        f"AP {percent(trial_ap(t))} at {res}",
        flops,
        f"teacher {r.teacher or '?'}",
        f"student {_wrap_student(r.student or '?')}",
    ]
    return "<br>".join(parts)


def _resolution_order(keys: set[str]) -> list[str]:
    from jdsearch.core.resolution import Resolution

    def key(text: str) -> tuple[int, str]:
        try:
            return (Resolution.parse(text).pixels, text)
        except JDSearchError:
            return (0, text)

    return sorted(keys, key=key)


def upgraded_label(trials: Sequence[FrozenTrial], number: int) -> str:
    """``trial N, best H`` when trial ``number`` is the best completed trial, else ``trial N``."""
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
    done = require_completed(trials, "H per iteration")
    records = [TrialRecord.from_trial(t) for t in done]
    resolutions = _resolution_order({res for r in records for res in r.h})
    fig = go.Figure()
    for res in resolutions:
        pts = [(r.number, float(r.h[res])) for r in records if res in r.h]
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
            y=[trial_h(b) for b in best],
            mode="lines",
            line_shape="hv",  # type: ignore[arg-type]
            name="best H so far",
            line={"color": "black", "width": 2},
            customdata=[b.number for b in best],
            hovertemplate="trial %{x}: best H %{y:.4f} (trial %{customdata})<extra></extra>",
        )
    )
    n_failed = len(failed_trials(trials))
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
        for t in require_completed(trials, "the Pareto front")
        if math.isfinite(trial_ap(t)) and math.isfinite(trial_gflops(t)[0])
    ]
    if not done:
        raise JDSearchError("report: no completed trial records both AP and FLOPs")
    top = _completed_trial(trials, best)
    if top.number not in {t.number for t in done}:
        raise JDSearchError(
            f"report: trial {top.number} records no AP or FLOPs to mark in the AP–FLOPs plot"
        )
    at_best = [trial_gflops(t)[1] is not None for t in done]
    symbols = ["circle" if ok else "circle-open" for ok in at_best]
    fig = go.Figure()
    marker = {"color": "#8c9fb8", "size": 7, "symbol": symbols}
    fig.add_trace(_ap_flops(done, mode="markers", name="trials", marker=marker))
    fig.add_trace(
        _ap_flops(
            pareto_front(done),
            mode="lines+markers",
            line_shape="hv",
            name="Pareto front",
            line={"color": "#d62728", "width": 2},
            marker={"color": "#d62728", "size": 9},
        )
    )
    roots = [t for t in done if TrialRecord.from_trial(t).move == BASE_MOVE]
    if roots:
        marker = {"symbol": "square", "size": 13, "color": "#444444"}
        name = f"base (trial {roots[0].number})"
        fig.add_trace(_ap_flops(roots[:1], mode="markers", name=name, marker=marker))
    marker = {"symbol": "star", "size": 17, "color": "#ffbf00", "line": _BLACK_EDGE}
    name = f"upgraded ({upgraded_label(trials, top.number)})"
    fig.add_trace(_ap_flops([top], mode="markers", name=name, marker=marker))
    fig.update_layout(
        title="AP vs complexity of every completed trial, with the Pareto front",
        xaxis_title=_flops_axis_title(at_best),
        yaxis_title="AP (%) at the trial's best resolution",
    )
    return fig


_BLACK_EDGE = {"color": "black", "width": 1}


def fig_cost_front(
    trials: Sequence[FrozenTrial], *, best: int | None = None, cost: str = "cost"
) -> go.Figure:
    """A Pareto study's front (``score.mode: pareto``): AP against the cost of the score, both
    where each trial scored best (the study's own values, :meth:`TrialRecord.point`), the
    non-dominated trials as a step line, the base trial and the upgraded trial (the best H, or
    trial ``best``: the chosen student) marked. ``cost`` names the cost on the axis."""
    done = [t for t in require_completed(trials, "the front") if _cost_point(t) is not None]
    if not done:
        raise JDSearchError("report: no completed trial records both AP and its cost")
    top = _completed_trial(trials, best)
    if _cost_point(top) is None:
        raise JDSearchError(f"report: trial {top.number} records no cost to mark on the front")
    fig = go.Figure()
    marker = {"color": "#8c9fb8", "size": 7}
    fig.add_trace(_ap_cost(done, mode="markers", name="trials", marker=marker))
    front_line = {"color": "#d62728", "width": 2}
    fig.add_trace(
        _ap_cost(
            front_of(done),
            mode="lines+markers",
            line_shape="hv",
            name="Pareto front",
            line=front_line,
            marker={"color": "#d62728", "size": 9},
        )
    )
    roots = [t for t in done if TrialRecord.from_trial(t).move == BASE_MOVE]
    if roots:
        marker = {"symbol": "square", "size": 13, "color": "#444444"}
        fig.add_trace(
            _ap_cost(
                roots[:1], mode="markers", name=f"base (trial {roots[0].number})", marker=marker
            )
        )
    marker = {"symbol": "star", "size": 17, "color": "#ffbf00", "line": _BLACK_EDGE}
    name = f"upgraded ({upgraded_label(trials, top.number)})"
    fig.add_trace(_ap_cost([top], mode="markers", name=name, marker=marker))
    fig.update_layout(
        title="AP vs cost of every completed trial, with the Pareto front the search kept",
        xaxis_title=f"{cost}: (C/C_base)·(R/R_base)^β at the trial's best resolution",
        yaxis_title="AP (%) at the trial's best resolution",
    )
    return fig


def _cost_point(t: FrozenTrial) -> tuple[float, float] | None:
    return TrialRecord.from_trial(t).point()


def _ap_cost(ts: Sequence[FrozenTrial], **kw: Any) -> go.Scatter:
    """Trials as points of the cost front (cost, AP %), with the trial hover."""
    points = [_cost_point(t) or (math.nan, math.nan) for t in ts]
    return go.Scatter(
        x=[c for _, c in points],
        y=[100 * ap for ap, _ in points],
        customdata=[t.number for t in ts],
        text=[_hover(t) for t in ts],
        hovertemplate="%{text}<extra></extra>",
        **kw,
    )


def _ap_flops(ts: Sequence[FrozenTrial], **kw: Any) -> go.Scatter:
    """Trials as points of fig. 9 (GFLOPs, AP %), with the trial hover."""
    return go.Scatter(
        x=[trial_gflops(t)[0] for t in ts],
        y=[100 * trial_ap(t) for t in ts],
        customdata=[t.number for t in ts],
        text=[_hover(t) for t in ts],
        hovertemplate="%{text}<extra></extra>",
        **kw,
    )


def _flops_axis_title(at_best: Sequence[bool]) -> str:
    if all(at_best):
        return "GFLOPs (multiply-adds at the trial's best resolution)"
    if any(at_best):
        return (
            "GFLOPs (multiply-adds at the trial's best resolution; "
            "open circles: at the base resolution, no flops_at recorded)"
        )
    return "GFLOPs (multiply-adds at the base resolution: these trials record no flops_at)"


def fig_teacher_capacity(
    trials: Sequence[FrozenTrial], *, count: Callable[[str], int] | None = None
) -> go.Figure:
    """Fig. 5: left, the backbone parameters of the best student's teacher so far; right, their
    distribution over all completed trials. ``count`` counts a teacher config that lacks the
    ``teacher_params`` attribute."""
    done = require_completed(trials, "teacher capacity")
    params = teacher_params(done, count)
    best = running_best(done)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        subplot_titles=("teacher of the best student so far", "teachers over all trials"),
    )
    numbers = [t.number for t in done]
    fig.add_trace(
        go.Scatter(
            x=numbers,
            y=[params[t.number] / 1e6 for t in done],
            mode="markers",
            name="sampled teacher",
            marker={"color": "#bbbbbb", "size": 6},
            customdata=numbers,
            text=[TrialRecord.from_trial(t).teacher or "?" for t in done],
            hovertemplate="trial %{x}: %{text}<br>%{y:.3f} M<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(_best_teacher_line(numbers, best, params), row=1, col=1)
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


def _best_teacher_line(
    numbers: Sequence[int], best: Sequence[FrozenTrial], params: Mapping[int, int]
) -> go.Scatter:
    return go.Scatter(
        x=list(numbers),
        y=[params[b.number] / 1e6 for b in best],
        mode="lines+markers",
        line_shape="hv",
        name="best student's teacher",
        line={"color": "#d62728", "width": 2},
        customdata=[b.number for b in best],
        text=[TrialRecord.from_trial(b).teacher or "?" for b in best],
        hovertemplate="trial %{x}: best is trial %{customdata}<br>teacher %{text}<br>"
        "%{y:.3f} M<extra></extra>",
    )


def fig_action_gain(trials: Sequence[FrozenTrial], *, phases: int = 4) -> go.Figure:
    """Fig. 6 over :func:`action_gains`' generation phases. Top: the score increment each action
    family brought (summed positive H(child) − H(parent)), stacked per phase. Bottom: each family's
    share of the phase's beneficial actions, stacked to 100 %; a phase without a beneficial action
    has no bar, only a note saying so."""
    require_completed(trials, "the action analysis")
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
        fig.add_trace(_increment_bar(gains, fam, labels), row=1, col=1)
        fig.add_trace(_share_bar(gains, fam, labels), row=2, col=1)
    for p in gains.phases:
        if gains.beneficial_in(p.index) == 0:
            fig.add_annotation(
                x=p.label,
                y=50,
                xref="x2",
                yref="y2",
                showarrow=False,
                text="no beneficial action",
                hovertext=f"{p.label}: none of its {gains.scored_in(p.index)} scored actions "
                "improved on its parent",
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


def _increment_bar(gains: ActionGains, fam: str, labels: Sequence[str]) -> go.Bar:
    """Fig. 6 top: the ΔH that family ``fam``'s beneficial actions brought in each phase."""
    cells = [gains.cell(p.index, fam) for p in gains.phases]
    info = [
        f"{c.beneficial} beneficial of {c.scored} scored actions (net ΔH {c.net:+.4f}); "
        f"{c.unscored} without a completed parent, {c.failed} failed"
        for c in cells
    ]
    total = gains.increment(fam)
    return go.Bar(
        x=list(labels),
        y=[c.increment for c in cells],
        name=fam,
        legendgroup=fam,
        marker_color=_COLOURS.get(fam, "#7f7f7f"),
        text=info,
        textposition="none",
        hovertemplate=f"{fam}, %{{x}}<br>ΔH brought %{{y:.4f}} (whole search {total:.4f})"
        "<br>%{text}<extra></extra>",
    )


def _share_bar(gains: ActionGains, fam: str, labels: Sequence[str]) -> go.Bar:
    """Fig. 6 bottom: family ``fam``'s share of each phase's beneficial actions."""
    shares = [gains.share(p.index, fam) for p in gains.phases]
    info = [
        f"{gains.cell(p.index, fam).beneficial} of the phase's {gains.beneficial_in(p.index)} "
        "beneficial actions"
        for p in gains.phases
    ]
    return go.Bar(
        x=list(labels),
        y=[None if v is None else 100 * v for v in shares],
        name=fam,
        legendgroup=fam,
        marker_color=_COLOURS.get(fam, "#7f7f7f"),
        showlegend=False,
        text=info,
        textposition="none",
        hovertemplate=f"{fam}, %{{x}}<br>%{{y:.1f}} % of the beneficial actions"
        "<br>%{text}<extra></extra>",
    )


def fig_stage_flops(trials: Sequence[FrozenTrial], *, best: int | None = None) -> go.Figure:
    """Fig. 7: per-stage backbone GFLOPs (stem, stages 1–4) at the base resolution of the base trial
    and the upgraded student (the best, or trial ``best``), with the relative change on the
    student's bars."""
    base = base_trial(trials)
    top = _completed_trial(trials, best)
    label = upgraded_label(trials, top.number)
    stages = []
    for t in (base, top):
        s = TrialRecord.from_trial(t).stage_flops
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
    done = require_completed(trials, "the lineage tree")
    by_number = {t.number: t for t in done}
    target = _completed_trial(done, best).number
    ex: list[float | None] = []
    ey: list[float | None] = []
    for t in done:
        p = parent_of(t)
        if p in by_number:
            ex += [p, t.number, None]
            ey += [trial_h(by_number[p]), trial_h(t), None]
    fig = go.Figure()
    edges = {"color": "#cccccc", "width": 1}
    fig.add_trace(
        go.Scatter(x=ex, y=ey, mode="lines", name="parent → child", line=edges, hoverinfo="skip")
    )
    path = [t for t in lineage_path(trials, target) if t.number in by_number]
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in path],
            y=[trial_h(t) for t in path],
            mode="lines",
            name=f"path to trial {target}",
            line={"color": "#ffbf00", "width": 5},
            customdata=[t.number for t in path],
            hoverinfo="skip",
        )
    )
    groups: dict[str, list[FrozenTrial]] = {}
    for t in done:
        move = TrialRecord.from_trial(t).move
        groups.setdefault(action_family(move) or "base", []).append(t)
    on_path = {t.number for t in path}
    for fam in ["base", *FAMILIES, *sorted(set(groups) - {"base", *FAMILIES})]:
        if groups.get(fam):
            fig.add_trace(_lineage_nodes(fam, groups[fam], on_path))
    label = upgraded_label(done, target)
    fig.update_layout(
        title=f"Search lineage: {len(done)} completed trials, path base → upgraded ({label}) "
        "highlighted",
        xaxis_title="trial number",
        yaxis_title="H",
        hovermode="closest",
    )
    return fig


def _lineage_nodes(fam: str, ts: Sequence[FrozenTrial], on_path: set[int]) -> go.Scatter:
    """One family's trials as lineage nodes, those on the highlighted path larger and outlined."""
    return go.Scatter(
        x=[t.number for t in ts],
        y=[trial_h(t) for t in ts],
        mode="markers",
        name=fam,
        marker={
            "color": _COLOURS.get(fam, "#7f7f7f"),
            "size": [13 if t.number in on_path else 8 for t in ts],
            "line": {"color": "black", "width": [2 if t.number in on_path else 0 for t in ts]},
        },
        customdata=[t.number for t in ts],
        text=[_hover(t) for t in ts],
        hovertemplate="%{text}<extra></extra>",
    )


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
        "pareto": _front_figure(handle, trials, top),
        "teacher_capacity": fig_teacher_capacity(trials, count=count),
        "action_gain": fig_action_gain(trials, phases=phases),
        "stage_flops": fig_stage_flops(trials, best=top),
        "lineage": fig_lineage(trials, best=top),
    }
    assert tuple(figures) == FIGURE_KEYS
    return figures


def _front_figure(handle: StudyHandle, trials: Sequence[FrozenTrial], top: int) -> go.Figure:
    """Fig. 9 (AP vs FLOPs) for an H study; a Pareto study's own front (AP vs its cost)."""
    if len(handle.study.directions) < 2:
        return fig_pareto(trials, best=top)
    names = handle.study.metric_names or ["AP", "cost"]
    return fig_cost_front(trials, best=top, cost=names[-1])


def graph_object_id(key: str) -> str:
    """The optuna-dashboard id a figure is attached under (stable, so a new report overwrites)."""
    return _GRAPH_ID_PREFIX + key
