"""Explaining a finished search: the paper's figures 5–9 and the lineage (``figures``), what they
read from the trials (``trials``), table 4 (``compare``) and the offline HTML page (``html``).

Imports the search's queries and records, ``latency`` and ``flops``, and plotly; never the CLI.
"""

from __future__ import annotations

from jdsearch.core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["Comparison", "compare_study"], "compare"),
    **dict.fromkeys(["FIGURE_KEYS", "build_figures"], "figures"),
    **dict.fromkeys(["ReportFiles", "attach_figures", "write_report"], "html"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
