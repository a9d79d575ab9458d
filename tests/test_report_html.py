"""report.html: every number and picture it shows comes from the run's files."""
from __future__ import annotations

import base64
import csv
import html
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import _run_in_process, last_error_line, train_toy
from PIL import Image

from fgclf.report_html import confused_pairs


class _Page(HTMLParser):
    """The images (their data URLs), the per-class table's rows, the h3 headings and the scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.rows, self.h3, self.scripts, self.captions = [], [], [], 0, ""
        self._table = self._row = self._cell = self._h3 = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
            self.captions += attrs.get("alt", "") + "\n"
        elif tag == "table" and attrs.get("id") == "per-class":
            self._table = True
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "h3":
            self._h3 = ""
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "h3" and self._h3 is not None:
            self.h3.append(self._h3)
            self._h3 = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._h3 is not None:
            self._h3 += data


@pytest.fixture(scope="module")
def run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    train_toy(toy_root, out, "--train.epochs", "1")
    return out


def test_the_run_writes_a_self_contained_report(run):
    page = _Page()
    page.feed((run / "report.html").read_text())
    with open(run / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [r[0] for r in page.rows] == [r["class_name"] for r in per_class]
    assert [int(r[1]) for r in page.rows] == [int(r["support"]) for r in per_class]
    npz = np.load(run / "predictions.npz")
    names = [str(n) for n in npz["class_names"]]
    pairs = confused_pairs(npz["labels"], npz["probs"].argmax(1), 8)
    assert [h for h in page.h3 if " taken for " in h] == [f"{names[t]} taken for {names[p]}: {len(i)} images"
                                                          for t, p, i in pairs]
    assert all(src.startswith("data:image/") for src in page.images)  # nothing refers to a file
    cams = page.captions.count("Grad-CAM: why") + page.captions.count("Grad-CAM: evidence")
    assert cams == 2 * len(pairs) > 0  # both maps of every confused pair's image
    decoded = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) for src in page.images]
    wrong = int((npz["labels"] != npz["probs"].argmax(1)).sum())
    # curves + confusion matrix, the pairs' images and maps, the gallery
    assert len(decoded) >= 2 + 3 * len(pairs) + min(wrong, 24) and all(im.size[0] > 0 for im in decoded)
    assert page.scripts == 1


def test_report_script_rewrites_it_the_same(run, tmp_path):
    before = (run / "report.html").read_text()
    (run / "report.html").unlink()
    proc = _run_in_process("report.py", [str(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "report.html").read_text() == before
    proc = _run_in_process("report.py", [str(tmp_path)])
    assert proc.returncode == 2 and "not a finished run" in last_error_line(proc)


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(html_text: str, probe: str, page: Path) -> str:
    """Load ``html_text`` with the ``probe`` script appended (it reports into the title) from ``page`` in
    headless Chromium; assert it ran without console errors and return the title."""
    import subprocess

    page.write_text(html_text.replace("</body>", probe + "</body>"))
    proc = subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not [ln for ln in console if "Uncaught" in ln or ":ERROR:" in ln], console
    return proc.stdout.split("<title>", 1)[1].split("</title>", 1)[0]


NO_CHROMIUM = "no Chromium here: `make browser` installs Debian's (make test runs it)"


@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_report_opens_in_a_headless_browser(run, tmp_path):
    """Chromium loads the page without console errors, decodes every inlined image and sorts the
    per-class table when a header is clicked (a probe script appended to a copy reports into the title)."""
    probe = """<script>
window.addEventListener('load', function(){
  var ok = Array.from(document.images).filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
  document.querySelectorAll('#per-class th')[2].click();  // accuracy, ascending
  var first = document.querySelector('#per-class tbody tr td:nth-child(3)').textContent;
  document.title = 'probe ' + ok + '/' + document.images.length + ' ' + first;
});
</script>"""
    title = _browse((run / "report.html").read_text(), probe, tmp_path / "report.html")
    _, counts, first = title.split(" ")
    ok, total = map(int, counts.split("/"))
    assert total >= 2 and ok == total
    with open(run / "per_class.csv", newline="") as f:
        lowest = min(float(r["accuracy"]) for r in csv.DictReader(f))
    assert float(first) == pytest.approx(lowest, abs=1e-4)


@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_comparison_opens_in_a_headless_browser(tmp_path):
    """A comparison's summary.html (tests/test_compare_html.py's runs, one group named with a <script>):
    no console errors (the name's script does not run), the plot decodes, and a click on the top1
    table's max header sorts its groups by their largest top1."""
    import json

    from test_compare_html import make_comparison

    cmp = make_comparison(tmp_path)
    probe = """<script>
window.addEventListener('load', function(){
  var ok = Array.from(document.images).filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
  var table = document.querySelector('table[data-metric="top1"]');
  table.querySelectorAll('th')[6].click();  // max, ascending
  var order = Array.from(table.tBodies[0].rows).map(function(r){ return r.cells[0].textContent; });
  document.title = 'probe ' + ok + '/' + document.images.length + ' ' + JSON.stringify(order);
});
</script>"""
    title = _browse((cmp / "summary.html").read_text(), probe, tmp_path / "summary.html")
    _, counts, order = title.split(" ", 2)
    assert counts == "1/1"
    top1 = [s for s in json.loads((cmp / "summary.json").read_text())["summaries"] if s["metric"] == "top1"]
    expected = [s["group"] for s in sorted(top1, key=lambda s: s["max"])]
    assert json.loads(html.unescape(order)) == expected != [s["group"] for s in top1]  # the click reordered them
