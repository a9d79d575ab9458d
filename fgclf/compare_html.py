"""``summary.html``: a comparison of groups of runs (:func:`fgclf.compare.compare_groups`) as one
self-contained page beside summary.md, and the run table of ``compare_runs.py --output`` as HTML.

Every cell is the string summary.md shows (the same cell builders of :mod:`fgclf.compare`), one
table per metric (the metrics of coarser label levels, ``<level>.<metric>``, under their own
heading); comparison.png is inlined as base64 and a click on a column header sorts a table (the
style and script of the per-run ``report.html``, :mod:`fgclf.report_html`).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional, Sequence

from fgclf.compare import (COST_HEAD, COST_TEXT, MCNEMAR_HEAD, comparison_section, cost_cells, intervals_text,
                           mcnemar_cells, mcnemar_text, runs_text, summary_cells, summary_head)
from fgclf.report_html import SORT_JS, STYLE

h = html.escape


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], attrs: str = "") -> str:
    """A sortable table; every cell escaped."""
    return (f"<table class='sortable'{attrs}><thead><tr>" + "".join(f"<th>{h(c)}</th>" for c in head)
            + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{h(c)}</td>" for c in row) + "</tr>"
                                               for row in rows) + "</tbody></table>")


def _page(title: str, body: Sequence[str]) -> str:
    return "\n".join([f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{h(title)}</title>",
                      f"<style>{STYLE}</style></head><body>", f"<h1>{h(title)}</h1>", *body,
                      f"<script>{SORT_JS}</script></body></html>"]) + "\n"


def comparison_html(result: dict, png: Optional[Path] = None) -> str:
    """The page of a :func:`~fgclf.compare.compare_groups` result: the groups' runs, per metric a table of
    the groups (n, mean ± std, t and bootstrap intervals, min, max), the paired tests of each group
    against the baseline with their footnotes, McNemar, costs and notes when there are any, and ``png``
    (comparison.png) inlined when given and present."""
    pct = f"{result['confidence']:.0%}"
    base = result["baseline"]
    body = ["<ul>"] + [f"<li><b>{h(g)}</b>: {h(runs_text(runs))}</li>" for g, runs in result["groups"].items()]
    body += ["</ul>", f"<p>{h(intervals_text(result))} Click a column header to sort a table.</p>"]
    head = summary_head(pct)[1:]  # the metric is the table's heading
    for levels in (False, True):
        metrics = [m for m in result["metrics"] if ("." in m) == levels]
        if metrics:
            body.append("<h2>Coarser label levels, per group</h2>" if levels else "<h2>Per group</h2>")
        for m in metrics:
            rows = [summary_cells(s)[1:] for s in result["summaries"] if s["metric"] == m]
            body += [f"<h3>{h(m)}</h3>", _table(head, rows, f" data-metric='{h(m)}'")]
    if result["comparisons"]:
        body.append(f"<h2>Paired differences against {h(base)} (group - baseline)</h2>")
        for comp in result["comparisons"]:
            sec = comparison_section(comp, pct)
            body += [f"<h3>{h(sec['title'])}</h3>", *(f"<p>{h(line)}</p>" for line in sec["text"])]
            if sec["rows"]:
                body.append(_table(sec["head"], sec["rows"], f" data-group='{h(comp['group'])}'"))
            body += [f"<p>{h(note)}</p>" for note in sec["notes"]]
    if result["mcnemar"]:
        body += ["<h2>McNemar on the shared test set (top-1 correctness per sample)</h2>",
                 f"<p>{h(mcnemar_text(base))}</p>",
                 _table(MCNEMAR_HEAD, [mcnemar_cells(m) for m in result["mcnemar"]], " id='mcnemar'")]
    if result.get("costs"):
        body += ["<h2>Cost per group</h2>", f"<p>{h(COST_TEXT)}</p>",
                 _table(COST_HEAD, [cost_cells(g, c) for g, c in result["costs"].items()], " id='costs'")]
    if result["notes"]:
        body += ["<h2>Notes</h2><ul>", *(f"<li>{h(note)}</li>" for note in result["notes"]), "</ul>"]
    if png is not None and Path(png).is_file():
        b64 = base64.b64encode(Path(png).read_bytes()).decode()
        body.append(f"<h2>Means with t-intervals per metric</h2><img class='plot' src='data:image/png;base64,{b64}' "
                    "alt='Means with t-intervals per metric'>")
    return _page(f"Comparison of {len(result['groups'])} groups (baseline: {base})", body)


def table_html(head: Sequence[str], rows: Sequence[Sequence[str]], title: str = "Runs") -> str:
    """``compare_runs.py --output FILE.md``'s table as a page (FILE.html): the same cells, sortable."""
    return _page(title, ["<p>Click a column header to sort.</p>", _table(head, rows, " id='runs'")])


__all__ = ["comparison_html", "table_html"]
