"""summary.html of a comparison and the HTML run table: the cells parsed back from the page are the
numbers of summary.json (and metrics.json), every name is escaped, the plot is inlined."""
from __future__ import annotations

import base64
import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from fgclf.compare import compare_groups, write_comparison

EVIL = "<script>alert('x')</script>&"  # a group name a browser must show, not run


class Page(HTMLParser):
    """Every table (its attributes, the h2 and h3 above it, header and body cells), the paragraphs, the
    list items, the images' data URLs and the number of script elements."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables, self.paragraphs, self.items, self.images, self.scripts = [], [], [], [], 0
        self._heading = {"h2": "", "h3": ""}
        self._text = self._row = None
        self._thead = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": attrs, **self._heading, "head": [], "rows": []})
        elif tag == "thead":
            self._thead = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th", "p", "li", "h2", "h3"):
            self._text = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "thead":
            self._thead = False
        elif tag == "tr":
            if self._thead:
                self.tables[-1]["head"] = self._row
            else:
                self.tables[-1]["rows"].append(self._row)
        elif tag in ("td", "th"):
            self._row.append(self._text)
        elif tag in ("h2", "h3"):
            self._heading.update({tag: self._text} if tag == "h3" else {"h2": self._text, "h3": ""})
        elif tag == "p":
            self.paragraphs.append(self._text)
        elif tag == "li":
            self.items.append(self._text)
        if tag in ("td", "th", "p", "li", "h2", "h3"):
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text += data

    def table(self, **attrs) -> dict:
        (found,) = [t for t in self.tables if all(t["attrs"].get(k) == v for k, v in attrs.items())]
        return {"h2": found["h2"], "h3": found["h3"], "rows": [dict(zip(found["head"], r)) for r in found["rows"]]}


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]


def _run(path: Path, seed: int, **metrics) -> str:
    """A finished run as compare_groups reads it: metrics.json only."""
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"seed": seed, "model": "resnet18", **metrics}))
    return str(path)


def make_comparison(tmp: Path) -> Path:
    """ce and focal over 10 seeds (bootstrap intervals shown; focal's f1_macro is ce's + 0.02 on every seed:
    zero variance), EVIL over 3 of them (Wilcoxon cannot reach 0.05, seeds left out); a coarser
    ``genus`` level; costs recorded by ce and focal only. Written by write_comparison into tmp/cmp."""
    rng = np.random.default_rng(0)
    top1, f1, genus = (0.7 + 0.03 * rng.standard_normal(10) for _ in range(3))
    groups: dict[str, list[str]] = {"ce": [], "focal": [], EVIL: []}
    for s in range(10):
        cost = {"parameters": {"trainable": 1000 * (s + 1)}, "train_seconds": 10.0 + s}
        groups["ce"].append(_run(tmp / f"ce_s{s}", s, top1=top1[s], f1_macro=f1[s],
                                 levels={"genus": {"top1": genus[s]}}, **cost))
        groups["focal"].append(_run(tmp / f"focal_s{s}", s, top1=top1[s] + 0.01 + 0.02 * rng.standard_normal(),
                                    f1_macro=f1[s] + 0.02, levels={"genus": {"top1": genus[s] - 0.01 * s}}, **cost))
        if s < 3:
            groups[EVIL].append(_run(tmp / f"evil_s{s}", s, top1=top1[s] - 0.05 * s, f1_macro=0.5 + 0.1 * s,
                                     levels={"genus": {"top1": 0.9 - 0.02 * s}}))
    result = compare_groups(groups, ["top1", "f1_macro", "genus.top1"], n_boot=200)
    return write_comparison(result, tmp / "cmp")


@pytest.fixture(scope="module")
def cmp(tmp_path_factory) -> Path:
    return make_comparison(tmp_path_factory.mktemp("compare_html"))


def test_summary_tables_are_summary_json(cmp):
    data, page = json.loads((cmp / "summary.json").read_text()), Page((cmp / "summary.html").read_text())
    assert len(data["summaries"]) == 9
    for s in data["summaries"]:
        table = page.table(**{"data-metric": s["metric"]})
        assert table["h3"] == s["metric"]
        assert table["h2"] == ("Coarser label levels, per group" if s["metric"] == "genus.top1" else "Per group")
        row = next(r for r in table["rows"] if r["group"] == s["group"])
        assert int(row["n"]) == s["n"]
        assert _numbers(row["mean ± std"]) == pytest.approx([s["mean"], s["std"]], abs=5e-5)
        assert _numbers(row["95% t-CI"]) == pytest.approx([s["ci_lo"], s["ci_hi"]], abs=5e-5)
        boot = row["95% bootstrap CI"]
        if s["n"] >= 10:
            assert _numbers(boot) == pytest.approx([s["boot_lo"], s["boot_hi"]], abs=5e-5)
        else:
            assert s["boot_note"] and boot == "n/a (n < 10)"
        assert _numbers(row["min"] + " " + row["max"]) == pytest.approx([s["min"], s["max"]], abs=5e-5)


def test_paired_tests_and_their_warnings_are_summary_json(cmp):
    data, page = json.loads((cmp / "summary.json").read_text()), Page((cmp / "summary.html").read_text())
    assert [c["group"] for c in data["comparisons"]] == ["focal", EVIL]
    for comp in data["comparisons"]:
        table = page.table(**{"data-group": comp["group"]})
        assert table["h3"] == f"{comp['group']} - ce"
        assert table["h2"] == "Paired differences against ce (group - baseline)"
        rows = {r["metric"]: r for r in table["rows"]}
        assert list(rows) == data["metrics"]
        for metric, entry in comp["metrics"].items():
            t, w, row = entry["ttest"], entry["wilcoxon"], rows[metric]
            assert int(row["pairs"]) == t["n"] == comp["n_pairs"]
            assert _numbers(row["mean diff"]) == pytest.approx([t["mean_diff"]], abs=5e-5)
            if t["zero_variance"]:
                assert row["95% CI"] == row["paired t p"] == "zero variance (z)"
            else:
                assert _numbers(row["95% CI"]) == pytest.approx([t["ci_lo"], t["ci_hi"]], abs=5e-5)
                assert _numbers(row["paired t p"]) == pytest.approx([t["p"]], rel=5e-3)
            assert _numbers(row["Wilcoxon p"]) == pytest.approx([w["p"]], rel=5e-3)
            assert row["Wilcoxon p"].endswith(" (!)") == bool(w["warning"])
            assert not w["warning"] or f"(!) {w['warning']}." in page.paragraphs
    focal, evil = data["comparisons"]
    assert focal["metrics"]["f1_macro"]["ttest"]["zero_variance"]  # else the test above proves nothing about it
    assert [p for p in page.paragraphs if p.startswith("(z) ")] == [
        "(z) every paired difference is the same for f1_macro (+0.02 in every pair): zero variance, so no t-test "
        "p-value or interval (scipy would print t = inf, p = 0, which only says the runs did not vary); more seeds "
        "or folds are needed."]
    assert evil["metrics"]["top1"]["wilcoxon"]["warning"] and len(evil["unpaired"]) == 7
    assert [f"Left out: {u['run']} ({u['reason']})." for u in evil["unpaired"]] == [
        p for p in page.paragraphs if p.startswith("Left out: ")]


def test_costs_groups_and_plot(cmp):
    data, page = json.loads((cmp / "summary.json").read_text()), Page((cmp / "summary.html").read_text())
    rows = {r["group"]: r for r in page.table(id="costs")["rows"]}
    assert list(rows) == list(data["costs"])
    for group, c in data["costs"].items():
        for column, key in (("trainable params", "trainable_params"), ("train s", "train_seconds")):
            cell = rows[group][column].replace(",", "")  # rounded to integers
            assert (cell == "") if c[key] is None else (_numbers(cell) == pytest.approx([c[key]], abs=0.5))
    assert rows["ce"]["trainable params"] == "5,500" and rows[EVIL]["train s"] == ""
    assert [i.split(":")[0] for i in page.items] == list(data["groups"])
    (src,) = page.images
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == (cmp / "comparison.png").read_bytes()


def test_group_names_are_escaped(cmp):
    text = (cmp / "summary.html").read_text()
    page = Page(text)
    assert page.scripts == 1  # the sorting script only: EVIL's <script> is text
    assert EVIL not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in text
    assert EVIL in [r["group"] for r in page.table(**{"data-metric": "top1"})["rows"]]  # shown as written


def test_run_table_html_has_the_markdown_cells(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_runs_html", REPO / "scripts" / "compare_runs.py")
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    a = _run(tmp_path / "a", 1, top1=0.123456, best_epoch=3, train_seconds=12.34, model="<b>net</b>")
    b = _run(tmp_path / "b&c", 2, top1=0.75, best_epoch=4, train_seconds=7.0)
    assert compare_runs.main([a, b, "--metrics", "top1", "best_epoch", "train_seconds",
                              "--output", str(tmp_path / "t.md")]) == 0
    md = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "t.md").read_text().splitlines()]
    page = Page((tmp_path / "t.html").read_text())
    (table,) = page.tables
    assert table["head"] == md[0] == ["run", "model", "method", "trains", "top1", "best_epoch", "train_seconds"]
    assert table["rows"] == md[2:]
    assert [r[:2] for r in table["rows"]] == [["a", "<b>net</b>"], ["b&c", "resnet18"]]
    for row, path in zip(table["rows"], (a, b)):
        m = json.loads(Path(path, "metrics.json").read_text())
        assert _numbers(row[4]) == pytest.approx([m["top1"]], abs=5e-5) and int(row[5]) == m["best_epoch"]
        assert _numbers(row[6]) == pytest.approx([m["train_seconds"]], abs=0.05)
    assert "<b>net" not in (tmp_path / "t.html").read_text() and page.scripts == 1
    assert compare_runs.main([a, "--output", str(tmp_path / "t.html")]) == 2
    assert "the HTML table is written beside it" in capsys.readouterr().err
