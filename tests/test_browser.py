"""The pictures, checked in a real browser: headless Chromium (driven by Playwright) opens
``report.html`` and optuna-dashboard serving the same finished study, and kaleido writes the PNGs.

One report of the small study (PNGs, and figures attached to a copy of its database) is shared by
the module. Without Chromium, Playwright or kaleido the tests skip on a developer's machine and
fail in CI (``CI`` set), where ``.ci/run`` installs Chromium and the ``dev`` extra the rest.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import pytest
from optuna_dashboard import get_note
from PIL import Image

from jdsearch.report import html as report_html
from jdsearch.report.figures import FIGURE_KEYS, build_figures
from jdsearch.report.html import PNG_WIDTH, ReportFiles, write_report
from jdsearch.search.queries import StudyHandle, open_study
from jdsearch.search.record import TrialRecord
from jdsearch.storage.optuna_internals import trial_of

from .conftest import unavailable
from .test_dashboard import dashboard_command, free_port, get, server

pytestmark = pytest.mark.slow  # a real (tiny) search, a browser, a server
RENDER_TIMEOUT_MS = 60_000  # generous: a busy 2-core machine, the first paint of a React app


def _unavailable(why: str) -> None:
    """Skip on a developer's machine; fail in CI, where the pictures must be tested."""
    unavailable(why, "CI must test the pictures in a browser")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    _unavailable("no Chromium on PATH (apt-get install chromium)")
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Report:
    handle: StudyHandle
    url: str
    files: ReportFiles
    figures: dict[str, go.Figure]


@pytest.fixture(scope="module")
def report(small_study: Any, tmp_path_factory: pytest.TempPathFactory) -> Report:
    """The small study's report, PNGs included, its figures attached to a copy of the study."""
    root = tmp_path_factory.mktemp("browser")
    db = root / "study.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    url = f"sqlite:///{db}"
    handle = open_study(url, small_study.name)
    files = write_report(handle, root / "report", png=True, attach=True)
    return Report(handle, url, files, build_figures(handle))


@dataclass
class Page:
    """A browser page with every JavaScript error and every network request it made."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def _request_failed(seen: Page, request: Any) -> None:
    # Leaving a page cancels its requests still in flight (net::ERR_ABORTED): not a failure of
    # the page. Any other failed request (a refused connection, a missing file…) is an error.
    if request.failure != "net::ERR_ABORTED":
        seen.errors.append(f"request failed: {request.url} ({request.failure})")


@pytest.fixture(scope="module")
def new_page() -> Iterator[Callable[[], Page]]:
    """Opens pages in one headless Chromium; each records console errors and uncaught errors."""
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _unavailable(f"Playwright is not installed ({e}; it is in the dev extra)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)

        def open_page() -> Page:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            seen = Page(page)
            page.on("pageerror", lambda e: seen.errors.append(f"uncaught: {e}"))
            page.on(
                "console",
                lambda m: m.type == "error" and seen.errors.append(f"console: {m.text}"),
            )
            page.on("request", lambda r: seen.requests.append(r.url))
            page.on("requestfailed", lambda r: _request_failed(seen, r))
            page.set_default_timeout(RENDER_TIMEOUT_MS)
            return seen

        try:
            yield open_page
        finally:
            browser.close()


# JavaScript: every plotly plot on the page whose SVG is drawn, as {id, title, traces, ytitle}; a
# drawn plot has plotly's .main-svg, and one g.trace per trace of the figure.
DRAWN_PLOTS = """() => [...document.querySelectorAll('.js-plotly-plot')]
    .filter(d => d.querySelector('.main-svg') !== null)
    .map(d => ({
        id: d.id,
        title: (d.querySelector('.gtitle') || {}).textContent || '',
        traces: d.querySelectorAll('g.trace').length,
        ytitle: (d.querySelector('.ytitle') || {}).textContent || '',
    }))"""


def _title(fig: go.Figure) -> str:
    return str(fig.layout.title.text)


# ---------------------------------------------------------------------- PNGs
def test_report_writes_a_png_of_every_figure(report: Report) -> None:
    files = report.files
    if report_html._png_exporter_missing() is not None:
        _unavailable(f"{files.png_skipped}")
    _chromium()
    assert files.png_skipped is None, files.png_skipped
    assert list(files.png) == list(FIGURE_KEYS)
    assert files.png_seconds is not None and files.png_seconds > 0
    for key, path in files.png.items():
        assert path == files.html.parent / "figures" / f"{key}.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            height = report.figures[key].layout.height or 560
            assert image.size == (PNG_WIDTH, height), key
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        # A drawn chart has axes, text and coloured marks; a blank or failed render has a few.
        assert colours is None or len(colours) > 50, f"{key}: {len(colours or [])} colours"
    line = files.png_summary()
    assert line.startswith(f"PNGs: {len(FIGURE_KEYS)} figures written to ")
    assert str(files.html.parent / "figures") in line


def test_report_says_why_without_a_browser(
    report: Report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if report_html._png_exporter_missing() is not None:
        _unavailable(f"{report.files.png_skipped}")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    files = write_report(report.handle, tmp_path / "out", png=True, attach=False)
    assert files.png == {}
    assert files.png_skipped is not None and files.png_skipped.startswith("no browser for kaleido")
    assert not list((tmp_path / "out" / "figures").glob("*.png"))
    assert files.png_summary() == f"PNGs: none written ({files.png_skipped})"


# ---------------------------------------------------------------------- report.html
def test_report_html_renders_every_figure_offline(
    report: Report, new_page: Callable[[], Page]
) -> None:
    seen = new_page()
    seen.page.goto(report.files.html.as_uri())
    seen.page.wait_for_function(
        f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 && "
        f"document.querySelectorAll('.js-plotly-plot').length >= {len(FIGURE_KEYS)}"
    )
    drawn = {p["id"]: p for p in seen.page.evaluate(DRAWN_PLOTS)}
    assert set(drawn) == {f"fig-{key}" for key in FIGURE_KEYS}
    for key, fig in report.figures.items():
        assert drawn[f"fig-{key}"]["title"] == _title(fig), key
        assert drawn[f"fig-{key}"]["traces"] == len(fig.data), key
    assert seen.errors == []
    # Offline: the page loads only itself (plotly.js is inline), nothing from the network.
    assert seen.requests == [report.files.html.as_uri()]


# ---------------------------------------------------------------------- optuna-dashboard
def test_optuna_dashboard_shows_the_trials_their_notes_the_figures_and_H(
    report: Report, new_page: Callable[[], Page], tmp_path: Path
) -> None:
    study = report.handle.study
    trials = study.get_trials(deepcopy=False)
    last = TrialRecord.from_trial(trials[-1])
    heading = get_note(trial_of(study, trials[-1])).splitlines()[0].removeprefix("### ")
    titles = {_title(fig): key for key, fig in report.figures.items()}
    port = free_port()
    with server(dashboard_command(report.url, port), port, tmp_path / "dashboard.log") as base:
        (summary,) = json.loads(get(base, "/api/studies"))["study_summaries"]
        study_url = f"{base}/dashboard/studies/{summary['study_id']}"
        seen = new_page()
        page = seen.page
        page.goto(f"{base}/dashboard")
        page.get_by_text(study.study_name, exact=False).first.wait_for()
        page.goto(study_url)
        page.wait_for_function(
            f"() => ({DRAWN_PLOTS})().filter(p => p.traces > 0).length >= "
            f"{len(FIGURE_KEYS) + 1} && document.getElementById('plot-history') !== null"
        )
        drawn = page.evaluate(DRAWN_PLOTS)
        body = page.inner_text("body")
        page.goto(f"{study_url}/trials")
        page.get_by_text(f"{len(trials)} Trials").wait_for()
        listed = page.inner_text("body")
        # The note the worker wrote after the trial finished, on the trial's page, rendered.
        page.goto(f"{study_url}/trials?numbers={last.number}", wait_until="commit")
        page.locator("h3", has_text=heading).wait_for()
        table = page.locator("table").filter(has_text="resolution").first.inner_text()
        lineage = page.locator("strong", has_text="Lineage").first.inner_text()
        note = page.inner_text("body")
    attached = {titles[p["title"]]: p for p in drawn if p["title"] in titles}
    assert set(attached) == set(FIGURE_KEYS)  # every figure attached by the report, drawn
    for key, plot in attached.items():
        assert plot["traces"] == len(report.figures[key].data), key
    history = next(p for p in drawn if p["id"] == "plot-history")
    assert history["traces"] > 0 and history["ytitle"] == "H"  # set_metric_names(["H"])
    assert "Objective 0" not in body
    assert re.findall(r"^Trial (\d+)$", listed, re.MULTILINE) == [str(t.number) for t in trials]
    assert heading == f"Trial {last.number}: H {last.value:.4f} at {last.best_resolution}"
    for res, h in last.h.items():  # a row per resolution, H as the note's table prints it
        assert re.search(rf"^{res}\t.*\t{h:.4f}$", table, re.MULTILINE), table
    assert lineage == "Lineage" and f"{last.move} (#{last.number})" in note
    assert "###" not in note and "**" not in note and "`" not in note  # rendered Markdown
    assert seen.errors == []
