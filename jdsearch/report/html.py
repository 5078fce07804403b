"""The report on disk: ``report.html`` (one offline page), ``figures/*.json`` and PNGs, and the
figures attached to the study for optuna-dashboard.
"""

from __future__ import annotations

import html
import importlib.util
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.errors import JDSearchError
from jdsearch.report.compare import Comparison
from jdsearch.report.figures import build_figures, graph_object_id, upgraded_label, upgraded_trial
from jdsearch.report.trials import (
    base_gflops,
    best_trial,
    percent,
    phase_windows,
    trial_ap,
    trial_gflops,
    trial_h,
)
from jdsearch.search.queries import StudyHandle, front_of
from jdsearch.search.record import (
    BASE_FLOPS_ATTR,
    BASE_RESOLUTION_ATTR,
    STRATEGY_ATTR,
    TrialRecord,
)
from jdsearch.search.strategies import score_mode_named
from jdsearch.search.teacher_check import kd_summary

__all__ = [
    "ReportFiles",
    "attach_figures",
    "write_report",
]


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    html: Path
    figures: dict[str, Path]  # key → figures/<key>.json
    png: dict[str, Path] = field(default_factory=dict)  # key → figures/<key>.png (when exported)
    png_skipped: str | None = None  # why no PNG was written (None: all written)
    attached: tuple[str, ...] = ()  # optuna-dashboard graph object ids
    png_seconds: float | None = None  # how long PNG export took (None: not attempted)

    def png_summary(self) -> str:
        """One line: where the PNGs went and how long they took, or why (some) are missing."""
        if not self.png:
            return f"PNGs: none written ({self.png_skipped})"
        where = self.png[next(iter(self.png))].parent
        took = f" in {self.png_seconds:.1f} s" if self.png_seconds is not None else ""
        line = f"PNGs: {len(self.png)} figures written to {where}{took}"
        return f"{line}; {self.png_skipped}" if self.png_skipped else line


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
        return f"{g:.3f} GFLOPs at {html.escape(at)} ({base_gflops(t):.3f} at the base resolution)"
    return f"{g:.3f} GFLOPs at the base resolution"


def _summary(handle: StudyHandle, trials: Sequence[FrozenTrial], upgraded: FrozenTrial) -> str:
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    attrs = handle.study.user_attrs
    best = best_trial(trials)
    score = handle.spec.score
    base_res = html.escape(str(attrs.get(BASE_RESOLUTION_ATTR, "?")))
    up = TrialRecord.from_trial(upgraded)
    if upgraded.number == best.number:
        which = "the best H"
    else:
        which = f"chosen for this report; the best H is trial {best.number}, H {trial_h(best):.4f}"
    parts = [
        f"{len(trials)} trials ({counts}).",
        f"Base resolution {base_res}, base detector "
        f"{float(attrs.get(BASE_FLOPS_ATTR, math.nan)) / 1e9:.3f} GFLOPs at {base_res}.",
        f"Search strategy {html.escape(str(attrs.get(STRATEGY_ATTR, 'hill_climb')))}, "
        f"distillation {html.escape(kd_summary(attrs))}.",
        f"Score H = {html.escape(score.metric)} × [(C/C<sub>base</sub>)·(R/R<sub>base</sub>)<sup>{score.beta:g}</sup>]"
        f"<sup>−{score.alpha:g}</sup>, C: {html.escape(score.cost)}.",
        *_pareto_phrase(handle, trials),
        f"Upgraded detector: trial {upgraded.number} ({which}), "
        f"H {trial_h(upgraded):.4f} ({html.escape(str(up.move))}), "
        f"AP {percent(trial_ap(upgraded))} at {html.escape(up.best_resolution or '?')}, "
        f"{_flops_phrase(upgraded)}.",
    ]
    return " ".join(parts)


def _pareto_phrase(handle: StudyHandle, trials: Sequence[FrozenTrial]) -> list[str]:
    """A Pareto study's sentence: what it optimises and how many trials its front holds."""
    if not score_mode_named(handle.spec.score.mode).has_front:
        return []
    n = len(front_of(trials))
    return [f"Pareto search (max AP, min cost): {n} non-dominated trial{'s' if n != 1 else ''}."]


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


# Kaleido renders every figure in one headless Chrome/Chromium session (starting the browser is
# most of the time: about 4 s, then about 0.4 s a figure); each figure is bounded by this timeout.
PNG_TIMEOUT_S = 60.0
PNG_WIDTH = 1100
_NO_BROWSER = (
    "no browser for kaleido: install Chrome or Chromium (apt-get install chromium) "
    "or set BROWSER_PATH"
)


def _png_exporter_missing() -> str | None:
    if importlib.util.find_spec("kaleido") is None:
        return 'no image exporter: kaleido is not installed (pip install -e ".[png]")'
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _render_pngs(figures: Mapping[str, go.Figure], paths: Mapping[str, Path]) -> list[str]:
    """Render every figure to its path in one kaleido session; the errors it reports, if any."""
    import kaleido

    specs = [
        {
            "fig": fig.to_plotly_json(),
            "path": paths[key],
            # The page's sizes: responsive width, 560 px high unless the figure sets its height.
            "opts": {"format": "png", "width": PNG_WIDTH, "height": fig.layout.height or 560},
        }
        for key, fig in figures.items()
    ]
    # mathjax=False: the figures use no LaTeX, and kaleido would fetch MathJax from a CDN.
    errors = kaleido.write_fig_from_object_sync(
        specs, kopts={"mathjax": False, "timeout": PNG_TIMEOUT_S}
    )
    return [_first_line(e) for e in errors or ()]


def _write_pngs(
    figures: Mapping[str, go.Figure], directory: Path
) -> tuple[dict[str, Path], str | None]:
    """Write ``<key>.png`` for every figure; returns the PNGs written and, unless all were, why."""
    missing = _png_exporter_missing()
    if missing is not None:
        return {}, missing
    paths = {key: directory / f"{key}.png" for key in figures}
    for path in paths.values():
        path.unlink(missing_ok=True)  # an old PNG must not pass for a new one
    from kaleido.errors import ChromeNotFoundError

    try:
        errors = _render_pngs(figures, paths)
    except ChromeNotFoundError:
        return {}, _NO_BROWSER
    except Exception as e:  # a browser that fails to start, a broken install…: report, don't fail
        errors = [_first_line(e)]
    written = {key: p for key, p in paths.items() if p.is_file() and p.stat().st_size > 0}
    if errors or len(written) < len(paths):
        failed = [key for key in paths if key not in written]
        which = f"failed for {', '.join(failed)}" if failed else "reported errors"
        return written, f"image export {which}: {'; '.join(errors) or 'no error reported'}"
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
    """Write the report of a study.

    Args:
        handle: the study, opened with :func:`jdsearch.search.open_study`.
        out_dir: the report folder: ``report.html`` (self-contained), ``figures/<key>.json`` and,
            when ``png`` and an exporter works, ``figures/<key>.png``.
        trial: the upgraded trial that the summary, figs. 7 and 9 and the lineage path show
            (default: the best).
        comparison: the table-4 comparison (:func:`jdsearch.report.compare.compare_study`) of the
            same study and trial, shown when given.
        png: write PNGs when kaleido and a Chrome/Chromium browser are present (one browser
            session for all figures, each bounded by :data:`PNG_TIMEOUT_S`); otherwise the
            returned ``png_skipped`` says why none were written.
        attach: also save the figures in the study for optuna-dashboard.
        phases: fig. 6's number of generation phases.

    Returns:
        What was written.

    Raises:
        JDSearchError: no completed trial, an output path that is a file, or a comparison of
            another study or trial.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise JDSearchError(f"report: output directory {out} exists and is not a directory")
    upgraded = upgraded_trial(handle, trial)
    _check_comparison(comparison, handle, upgraded.number)
    figures = build_figures(handle, trial=upgraded.number, phases=phases)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    json_paths = {}
    for key, fig in figures.items():
        json_paths[key] = fig_dir / f"{key}.json"
        json_paths[key].write_text(fig.to_json(), encoding="utf-8")
    png_paths: dict[str, Path] = {}
    png_skipped: str | None = "PNG export not requested"
    png_seconds: float | None = None
    if png:
        start = time.perf_counter()
        png_paths, png_skipped = _write_pngs(figures, fig_dir)
        png_seconds = time.perf_counter() - start
    html_path = out / "report.html"
    html_path.write_text(_page(handle, upgraded, figures, comparison, phases), encoding="utf-8")
    attached = attach_figures(handle, figures) if attach else ()
    return ReportFiles(html_path, json_paths, png_paths, png_skipped, attached, png_seconds)


def _check_comparison(comparison: Comparison | None, handle: StudyHandle, upgraded: int) -> None:
    if comparison is None:
        return
    if not isinstance(comparison, Comparison):
        raise JDSearchError(
            "report: comparison must be a jdsearch.report.compare.Comparison, "
            f"got {type(comparison).__name__}"
        )
    if comparison.study != handle.study.study_name:
        raise JDSearchError(
            f"report: the comparison is of study {comparison.study!r}, "
            f"not {handle.study.study_name!r}"
        )
    if comparison.upgraded.trial != upgraded:
        raise JDSearchError(
            f"report: the comparison's upgraded detector is trial {comparison.upgraded.trial}, "
            f"but the report is about trial {upgraded}"
        )


def _page(
    handle: StudyHandle,
    upgraded: FrozenTrial,
    figures: Mapping[str, go.Figure],
    comparison: Comparison | None,
    phases: int,
) -> str:
    """The whole HTML page: summary, comparison, a section per figure, plotly.js once."""
    from plotly.offline import get_plotlyjs

    name = html.escape(handle.study.study_name)
    trials = handle.study.get_trials(deepcopy=False)
    body = [
        f"<h1>Joint-DetNAS search report: {name}</h1>",
        f'<p class="summary">{_summary(handle, trials, upgraded)}</p>',
    ]
    if comparison is not None:
        body += [
            "<h2>Base vs upgraded detector (paper table 4)</h2>",
            "<p>The base trial and the upgraded student, each at its own input size, with the "
            "metrics the search recorded on the study's validation set. The paper's table 4 "
            "reports the same columns for R18/R50/R101/X101-FPN: higher AP at substantially "
            "lower FLOPs and latency.</p>",
            _comparison_html(comparison),
        ]
    links = " · ".join(f'<a href="#sec-{key}">{html.escape(_TEXT[key][0])}</a>' for key in figures)
    body.append(f"<nav><p>Figures: {links}</p></nav>")
    fill = {
        "upgraded": upgraded_label(trials, upgraded.number),
        "phases": str(len(phase_windows(trials, phases))),
    }
    notes = {"teacher_capacity": _no_teacher_note(handle, trials)}
    for key, fig in figures.items():
        body += _figure_section(key, fig, fill, notes.get(key, ""))
    head = [
        '<meta charset="utf-8">',
        f"<title>jdsearch report: {name}</title>",
        f"<style>{_STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
    ]
    document = ["<!DOCTYPE html>", '<html lang="en">', "<head>", *head, "</head>"]
    return "\n".join([*document, "<body>", *body, "</body>", "</html>", ""])


def _no_teacher_note(handle: StudyHandle, trials: Sequence[FrozenTrial]) -> str:
    """Fig. 5's note for a study whose trials distilled from no teacher (``kd.mode: off``, or
    the teacher check turned it off): empty when one trial had a teacher."""
    if any(TrialRecord.from_trial(t).teacher for t in trials if t.state == TrialState.COMPLETE):
        return ""
    kd = kd_summary(handle.study.user_attrs)
    return f"This study distilled from no teacher (KD {kd}): every teacher below has 0 parameters."


def _figure_section(key: str, fig: go.Figure, fill: Mapping[str, str], note: str = "") -> list[str]:
    title, text = _TEXT[key]
    div = fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=f"fig-{key}",
        default_height="560px" if key != "action_gain" else "660px",
        config={"responsive": True},
    )
    return [
        f'<h2 id="sec-{key}">{html.escape(title)}</h2>',
        f"<p>{html.escape(_render(text, **fill))}</p>",
        *([f'<p class="note">{html.escape(note)}</p>'] if note else []),
        f'<div class="figure">{div}</div>',
    ]
