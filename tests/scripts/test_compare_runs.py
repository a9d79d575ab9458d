"""scripts/compare_runs.py on fabricated run directories, numbers checked against scipy/statsmodels."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.weightstats import DescrStatsW

_spec = importlib.util.spec_from_file_location("compare_runs_script", REPO / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)

CE_TOP1 = [0.70, 0.72, 0.69, 0.71, 0.705]
FOCAL_TOP1 = [0.712, 0.738, 0.688, 0.726, 0.711]
CE_F1 = [0.65, 0.69, 0.66, 0.67, 0.64]
FOCAL_F1 = [0.66, 0.70, 0.655, 0.69, 0.661]


def make_run(path: Path, *, seed: int | None = None, seed_in_config_only: bool = False, labels=None, preds=None,
             image_ids=None, **metrics) -> Path:
    """A finished run directory: metrics.json, config.yaml (run.seed) and optionally predictions.npz."""
    path.mkdir(parents=True)
    m = {"model": "resnet18", "peft": "none", "strategy": "full", "num_samples": 100, **metrics}
    if seed is not None and not seed_in_config_only:
        m["seed"] = seed
    (path / "metrics.json").write_text(json.dumps(m))
    (path / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1}, "run": {"seed": seed}}))
    if labels is not None:
        labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
        logits = np.full((labels.size, 3), -1.0, np.float32)
        logits[np.arange(labels.size), preds] = 2.0
        arrays = {"logits": logits, "probs": np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
                  "labels": labels, "class_names": np.array(["a", "b", "c"])}
        if image_ids is not None:
            arrays["image_ids"] = np.asarray(image_ids).astype(np.str_)
        np.savez_compressed(path / "predictions.npz", **arrays)
    return path


def run_main(*argv) -> int:
    return compare_runs.main([str(a) for a in argv])


def _seed_groups(tmp_path: Path, ce_seeds, focal_seeds, **kw) -> tuple[list[Path], list[Path]]:
    ce = [make_run(tmp_path / f"ce_s{s}", seed=s, top1=CE_TOP1[i], f1_macro=CE_F1[i])
          for i, s in enumerate(ce_seeds)]
    focal = [make_run(tmp_path / f"focal_s{s}", seed=s, top1=FOCAL_TOP1[i], f1_macro=FOCAL_F1[i], **kw)
             for i, s in enumerate(focal_seeds)]
    return ce, focal


def _summary(out: Path, group: str, metric: str) -> dict:
    data = json.loads((out / "summary.json").read_text())
    return next(s for s in data["summaries"] if s["group"] == group and s["metric"] == metric)


def test_table_mode_unchanged(tmp_path, capsys):
    a = make_run(tmp_path / "a", seed=1, top1=0.5, f1_macro=0.25, best_epoch=3)
    b = make_run(tmp_path / "b", seed=1, top1=0.75, f1_macro=0.5, best_epoch=4)
    assert run_main(a, b, "--metrics", "top1", "best_epoch", "--output", tmp_path / "t.md") == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / "t.md").read_text()
    assert "| a | resnet18 | plain | full | 0.5000 | 3 |" in table and "| b | resnet18 | plain | full | 0.7500 | 4 |" in table


def test_groups_match_scipy_and_statsmodels(tmp_path, capsys):
    ce, focal = _seed_groups(tmp_path, range(1, 6), range(1, 6))
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--metrics", "top1", "f1_macro",
                    "--output-dir", out, "--n-boot", "2000") == 0
    stdout = capsys.readouterr().out
    for name in ("summary.md", "summary.html", "summary.csv", "summary.json", "comparison.png"):
        assert (out / name).is_file(), name
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").read_text() in stdout

    for group, values in (("ce", CE_TOP1), ("focal", FOCAL_TOP1), ("ce", CE_F1)):
        metric = "f1_macro" if values is CE_F1 else "top1"
        s = _summary(out, group, metric)
        assert s["n"] == 5 and s["mean"] == pytest.approx(np.mean(values))
        assert s["std"] == pytest.approx(np.std(values, ddof=1))
        assert (s["ci_lo"], s["ci_hi"]) == pytest.approx(DescrStatsW(np.array(values)).tconfint_mean(0.05))
        assert (s["min"], s["max"]) == (min(values), max(values))
        assert math.isnan(s["boot_lo"]) and s["boot_note"]  # 5 runs: too few for a bootstrap interval

    comp = json.loads((out / "summary.json").read_text())["comparisons"][0]
    assert comp["group"] == "focal" and comp["baseline"] == "ce" and comp["n_pairs"] == 5
    assert comp["paired_by"] == ["seed"] and comp["unpaired"] == []
    for metric, (base, other) in {"top1": (CE_TOP1, FOCAL_TOP1), "f1_macro": (CE_F1, FOCAL_F1)}.items():
        entry, ref = comp["metrics"][metric], st.ttest_rel(other, base)
        assert entry["ttest"]["mean_diff"] == pytest.approx(np.mean(np.subtract(other, base)))
        assert entry["ttest"]["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        ci = ref.confidence_interval(0.95)
        assert (entry["ttest"]["ci_lo"], entry["ttest"]["ci_hi"]) == pytest.approx((ci.low, ci.high))
        assert entry["wilcoxon"]["p"] == pytest.approx(st.wilcoxon(other, base).pvalue)
        assert entry["wilcoxon"]["min_attainable_p"] == pytest.approx(2 / 32) and entry["wilcoxon"]["warning"]
        assert "corrected_ttest" not in entry

    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((out / "summary.csv").open())}
    assert len(rows) == 4
    assert float(rows["ce", "top1"]["mean"]) == pytest.approx(np.mean(CE_TOP1), rel=1e-12)
    assert float(rows["focal", "top1"]["p_ttest"]) == pytest.approx(st.ttest_rel(FOCAL_TOP1, CE_TOP1).pvalue)
    assert rows["ce", "top1"]["p_ttest"] == "" and rows["focal", "f1_macro"]["n_pairs"] == "5"
    md = (out / "summary.md").read_text()
    assert "cannot reach p < 0.05" in md and "(!)" in md
    assert "| top1 | ce | 5 | " in md and "| n/a (n < 10) |" in md and "only from 10 runs up" in md


def test_bootstrap_shown_from_ten_seeds(tmp_path):
    rng = np.random.default_rng(4)
    ce = [make_run(tmp_path / f"ce_s{s}", seed=s, top1=float(v)) for s, v in enumerate(rng.normal(0.7, 0.02, 10))]
    focal = [make_run(tmp_path / f"fo_s{s}", seed=s, top1=float(v)) for s, v in enumerate(rng.normal(0.7, 0.02, 10))]
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--metrics", "top1", "--output-dir", out,
                    "--n-boot", "2000") == 0
    s = _summary(out, "ce", "top1")
    assert s["boot_note"] is None and s["min"] < s["boot_lo"] < s["mean"] < s["boot_hi"] < s["max"]
    assert f"[{s['boot_lo']:.4f}, {s['boot_hi']:.4f}]" in (out / "summary.md").read_text()


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's own, on the reference call
def test_constant_paired_difference_is_flagged_not_p_zero(tmp_path, capsys):
    # three seeds, focal one test image (of 100) better on each: scipy says p ~ 0, which is not evidence
    base, other = [0.42, 0.41, 0.39], [0.43, 0.42, 0.40]
    assert st.ttest_rel(other, base).pvalue < 1e-10
    ce = [make_run(tmp_path / f"ce_s{s}", seed=s, top1=v, f1_macro=v) for s, v in enumerate(base)]
    focal = [make_run(tmp_path / f"focal_s{s}", seed=s, top1=v, f1_macro=CE_F1[s]) for s, v in enumerate(other)]
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--metrics", "top1", "f1_macro",
                    "--output-dir", out) == 0
    entry = json.loads((out / "summary.json").read_text())["comparisons"][0]["metrics"]
    assert entry["top1"]["ttest"]["zero_variance"] and math.isnan(entry["top1"]["ttest"]["p"])
    assert entry["top1"]["ttest"]["mean_diff"] == pytest.approx(0.01)
    assert not entry["f1_macro"]["ttest"]["zero_variance"] and entry["f1_macro"]["ttest"]["p"] > 0
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| top1 | 3 |"))
    assert row.count("zero variance (z)") == 2 and "| 0 |" not in row
    assert "(z) every paired difference is the same for top1 (+0.01 in every pair)" in md
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["focal", "top1"]["zero_variance"] == "1" and rows["focal", "top1"]["p_ttest"] == "nan"
    assert rows["focal", "f1_macro"]["zero_variance"] == "0"


def test_seed_pairing_drops_unpaired_seed_and_says_so(tmp_path, capsys):
    ce = [make_run(tmp_path / f"ce_s{s}", seed=s, top1=CE_TOP1[i]) for i, s in enumerate([1, 2, 3, 4])]
    # focal seeds only in config.yaml (run.seed): the fallback must find them
    focal = [make_run(tmp_path / f"focal_s{s}", seed=s, seed_in_config_only=True, top1=FOCAL_TOP1[i])
             for i, s in enumerate([1, 2, 3, 5])]
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--metrics", "top1",
                    "--output-dir", out) == 0
    stdout = capsys.readouterr().out
    data = json.loads((out / "summary.json").read_text())
    comp = data["comparisons"][0]
    assert comp["n_pairs"] == 3 and comp["paired_keys"] == ["seed 1", "seed 2", "seed 3"]
    assert {(u["group"], u["key"]) for u in comp["unpaired"]} == {("ce", "seed 4"), ("focal", "seed 5")}
    assert comp["metrics"]["top1"]["ttest"]["p"] == pytest.approx(st.ttest_rel(FOCAL_TOP1[:3], CE_TOP1[:3]).pvalue)
    assert _summary(out, "focal", "top1")["n"] == 4  # the per-group summary still uses every run
    assert "seed 4 only in ce" in stdout and "seed 5 only in focal" in stdout
    assert "ce_s4" in stdout and "focal_s5" in stdout


def test_glob_patterns_per_group(tmp_path):
    sweep = tmp_path / "sweep"
    _seed_groups(sweep, [1, 2, 3], [1, 2, 3])
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", sweep / "ce_*", "--group", "focal", sweep / "focal_s[12]",
                    "--output-dir", out) == 0
    data = json.loads((out / "summary.json").read_text())
    assert data["metrics"] == ["top1", "f1_macro"]  # the defaults every run has (no top5, loss, ...)
    assert [Path(r["run"]).name for r in data["groups"]["ce"]] == ["ce_s1", "ce_s2", "ce_s3"]
    assert [Path(r["run"]).name for r in data["groups"]["focal"]] == ["focal_s1", "focal_s2"]
    assert data["comparisons"][0]["n_pairs"] == 2


def _prediction_runs(tmp_path: Path, b: int, c: int, both: int, neither: int, **damage) -> tuple[Path, Path]:
    """Two single runs whose per-sample correctness gives McNemar counts b (base right only), c."""
    n = b + c + both + neither
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, n)
    base_ok = np.array([1] * b + [0] * c + [1] * both + [0] * neither, bool)[rng.permutation(n)]
    other_ok = base_ok.copy()
    flip = np.flatnonzero(base_ok)[:b].tolist() + np.flatnonzero(~base_ok)[:c].tolist()
    other_ok[flip] = ~other_ok[flip]
    ids = [f"img{i:04d}" for i in range(n)]
    wrong = (labels + 1) % 3
    base = make_run(tmp_path / "ce", seed=0, top1=float(base_ok.mean()), labels=labels,
                    preds=np.where(base_ok, labels, wrong), image_ids=ids)
    other_labels = np.asarray(damage.get("labels", labels))
    other_ok = other_ok[:other_labels.size]
    other = make_run(tmp_path / "focal", seed=1, top1=float(other_ok.mean()), labels=other_labels,
                     preds=np.where(other_ok, other_labels, (other_labels + 1) % 3), image_ids=damage.get("ids", ids))
    return base, other


@pytest.mark.parametrize("b,c,exact", [(7, 2, True), (30, 14, False)])
def test_mcnemar_for_single_runs(tmp_path, b, c, exact):
    base, other = _prediction_runs(tmp_path, b, c, both=40, neither=13)
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", base, "--group", "focal", other, "--metrics", "top1", "--output-dir", out) == 0
    (res,) = json.loads((out / "summary.json").read_text())["mcnemar"]
    ref = sm_mcnemar([[40, b], [c, 13]], exact=exact, correction=True)
    assert (res["b"], res["c"], res["exact"], res["n"]) == (b, c, exact, b + c + 53)
    assert res["statistic"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert "McNemar" in (out / "summary.md").read_text()
    comp = json.loads((out / "summary.json").read_text())["comparisons"][0]  # seeds 0 and 1: still compared
    assert comp["paired_by"] == [] and comp["n_pairs"] == 1
    assert comp["metrics"]["top1"]["ttest"]["mean_diff"] == pytest.approx(-(b - c) / (b + c + 53))


@pytest.mark.parametrize("damage,needle", [("ids", "image_ids differ"), ("labels", "labels differ"),
                                           ("short", "60 vs 59 samples")])
def test_mcnemar_refuses_different_test_sets(tmp_path, capsys, damage, needle):
    n = 60
    kw = {"ids": {"ids": [f"other{i}" for i in range(n)]},
          "labels": {"labels": np.random.default_rng(9).integers(0, 3, n)},
          "short": {"labels": np.zeros(n - 1, np.int64), "ids": [f"img{i:04d}" for i in range(n - 1)]}}[damage]
    base, other = _prediction_runs(tmp_path, 4, 3, both=40, neither=13, **kw)
    assert run_main("--group", "ce", base, "--group", "focal", other, "--metrics", "top1",
                    "--output-dir", tmp_path / "cmp") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err
    assert "not evaluated on the same test set" in err


def test_missing_metrics_json_names_the_directory(tmp_path, capsys):
    ce, _ = _seed_groups(tmp_path, [1, 2], [])
    empty = tmp_path / "crashed_run"
    empty.mkdir()
    assert run_main("--group", "ce", *ce, "--group", "focal", empty, "--output-dir", tmp_path / "cmp") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {empty} has no metrics.json (not a finished run)"
    assert not (tmp_path / "cmp").exists()
    assert run_main(empty) == 2 and str(empty) in capsys.readouterr().err  # table mode too


@pytest.mark.parametrize("extra,needle", [
    (["--metrics", "nonexistent"], "has no 'nonexistent'"),
    (["--metrics", "model"], "is not a number"),
    (["--group", "ce", "{focal}"], "group name 'ce' is given twice"),
    (["--group", "{focal}", "{focal}"], "is a run directory; use --group NAME RUN"),
    (["--group", "empty"], "--group empty names no run directories"),
    (["--group", "x", "{tmp}/nomatch_*"], "matches no run directory"),
    (["--output", "{tmp}/x.md"], "--output is for the run table"),
])
def test_bad_requests_are_one_line_errors(tmp_path, capsys, extra, needle):
    ce, focal = _seed_groups(tmp_path, [1, 2], [1, 2])
    extra = [e.format(focal=focal[0], tmp=tmp_path) for e in extra]
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, *extra, "--output-dir", tmp_path / "cmp") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_duplicate_seed_in_a_group_is_refused(tmp_path, capsys):
    ce, _ = _seed_groups(tmp_path, [1, 2], [])
    focal = [make_run(tmp_path / name, seed=1, top1=0.7) for name in ("focal_a", "focal_b")]
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--output-dir", tmp_path / "cmp") == 2
    assert "both have seed 1; cannot pair them" in capsys.readouterr().err


def _cv_groups(tmp_path: Path, folds: int = 5, repeats: tuple[int, ...] = (0,)):
    rng = np.random.default_rng(3)
    ce, focal, values = [], [], {}
    for rep in repeats:
        for f in range(folds):
            a, b = 0.7 + 0.02 * rng.standard_normal(), 0.71 + 0.02 * rng.standard_normal()
            values[rep, f] = (a, b)
            # the shared test split (num_samples) differs from the held-out fold (n_val) on purpose
            common = {"fold": f, "n_train": 400, "n_val": 100, "num_samples": 250}
            ce.append(make_run(tmp_path / f"ce_r{rep}_f{f}", seed=rep, top1=a, **common))
            # focal's directory names sort in reverse fold order and its seeds differ from ce's
            focal.append(make_run(tmp_path / f"focal_r{rep}_{chr(ord('z') - f)}", seed=rep + 10 * (len(repeats) == 1),
                                  top1=b, **common))
    return ce, focal, values


def test_cv_folds_pair_by_fold_with_corrected_ttest(tmp_path, capsys):
    ce, focal, values = _cv_groups(tmp_path)
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--metrics", "top1", "--output-dir", out) == 0
    comp = json.loads((out / "summary.json").read_text())["comparisons"][0]
    assert comp["paired_by"] == ["fold"] and comp["n_pairs"] == 5 and (comp["n_train"], comp["n_test"]) == (400, 100)
    # n_test is the validation fold (n_val), not the test split (num_samples = 250)
    base = np.array([values[0, f][0] for f in range(5)])
    other = np.array([values[0, f][1] for f in range(5)])
    d = other - base
    t = d.mean() / math.sqrt((1 / 5 + 100 / 400) * d.var(ddof=1))  # Nadeau & Bengio (2003)
    entry = comp["metrics"]["top1"]
    assert entry["corrected_ttest"]["t"] == pytest.approx(t, rel=1e-9)
    assert entry["corrected_ttest"]["p"] == pytest.approx(2 * st.t.sf(abs(t), 4), rel=1e-9)
    assert entry["ttest"]["p"] == pytest.approx(st.ttest_rel(other, base).pvalue, rel=1e-9)
    assert entry["corrected_ttest"]["p"] > entry["ttest"]["p"]
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((out / "summary.csv").open())}
    assert float(rows["focal", "top1"]["p_corrected"]) == pytest.approx(entry["corrected_ttest"]["p"])
    half = st.t.ppf(0.975, 4) * abs(d.mean() / t)
    assert float(rows["focal", "top1"]["corrected_ci_lo"]) == pytest.approx(d.mean() - half, rel=1e-9)
    assert float(rows["focal", "top1"]["corrected_ci_hi"]) == pytest.approx(d.mean() + half, rel=1e-9)
    assert "Nadeau & Bengio" in capsys.readouterr().out


def test_repeated_cv_pairs_by_seed_and_fold(tmp_path):
    ce, focal, values = _cv_groups(tmp_path, folds=3, repeats=(0, 1))
    out = tmp_path / "cmp"
    assert run_main("--group", "ce", *ce, "--group", "focal", *focal, "--metrics", "top1", "--output-dir", out) == 0
    comp = json.loads((out / "summary.json").read_text())["comparisons"][0]
    assert comp["paired_by"] == ["seed", "fold"] and comp["n_pairs"] == 6
    keys = sorted(values)
    d = np.array([values[k][1] - values[k][0] for k in keys])
    ref = st.ttest_rel([values[k][1] for k in keys], [values[k][0] for k in keys])
    assert comp["metrics"]["top1"]["ttest"]["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert comp["metrics"]["top1"]["corrected_ttest"]["correction"] == pytest.approx(1 / 6 + 100 / 400)
    assert comp["metrics"]["top1"]["ttest"]["mean_diff"] == pytest.approx(d.mean())


def test_cv_runs_mixed_with_plain_runs_are_refused(tmp_path, capsys):
    ce, _, _ = _cv_groups(tmp_path, folds=2)
    plain = make_run(tmp_path / "plain", seed=0, top1=0.7)
    assert run_main("--group", "ce", *ce, "--group", "plain", plain, "--output-dir", tmp_path / "cmp") == 2
    assert "has no 'fold'" in capsys.readouterr().err


def _with_costs(path: Path, *, trainable: int, epoch_times, memory, train_seconds: float, files: dict) -> Path:
    """Add what run_costs reads to a run made by make_run: parameters, metrics.jsonl, best/ files."""
    m = json.loads((path / "metrics.json").read_text())
    m.update({"parameters": {"total": 10 * trainable, "trainable": trainable}, "train_seconds": train_seconds})
    (path / "metrics.json").write_text(json.dumps(m))
    lines = [json.dumps({"epoch": i + 1, "epoch_time": t, "memory_mb": mem}) for i, (t, mem) in
             enumerate(zip(epoch_times, memory))]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"epoch\": 9, \"epoch_ti")  # a cut last line
    best = path / "checkpoints" / "best"
    best.mkdir(parents=True)
    for name, size in files.items():
        (best / name).write_bytes(b"x" * size)
    return path


def test_costs_per_group_from_the_run_files(tmp_path):
    from fgclf.compare import compare_groups, costs_csv, format_markdown

    mib = 2 ** 20
    full = [_with_costs(make_run(tmp_path / f"full{s}", seed=s, top1=0.5), trainable=1000, epoch_times=[3.0, 1.0, 2.0],
                        memory=[100.0, 300.0, 200.0], train_seconds=6.0 + s,
                        files={"model.safetensors": 4 * mib, "config.json": mib // 2}) for s in (1, 2)]
    lora = [_with_costs(make_run(tmp_path / f"lora{s}", seed=s, top1=0.4), trainable=10, epoch_times=[5.0, 7.0],
                        memory=[50.0, 90.0 * s], train_seconds=12.0,
                        files={"model.safetensors": 4 * mib, "adapter_model.safetensors": mib // 4}) for s in (1, 2)]
    result = compare_groups({"full": [str(p) for p in full], "lora": [str(p) for p in lora]}, ["top1"])
    c = result["costs"]
    assert c["full"] == {"n": 2, "trainable_params": 1000.0, "epoch_seconds": 2.0, "train_seconds": 7.5,
                         "peak_memory_mb": 300.0, "best_mb": 4.5, "weights_mb": 4.0, "weights_file": "model.safetensors"}
    assert c["lora"]["epoch_seconds"] == 6.0 and c["lora"]["peak_memory_mb"] == 180.0
    assert c["lora"]["weights_mb"] == 0.25 and c["lora"]["weights_file"] == "adapter_model.safetensors"
    assert c["lora"]["best_mb"] == 4.25
    text = format_markdown(result)
    assert "| lora | 10 | 6.00 | 12 | 180 | 4.25 | 0.25 (adapter_model.safetensors) |" in text
    rows = list(csv.DictReader(costs_csv(result).splitlines()))
    assert [r["group"] for r in rows] == ["full", "lora"] and float(rows[0]["best_mb"]) == 4.5


def test_costs_missing_records_stay_blank(tmp_path):
    from fgclf.compare import run_costs

    run = make_run(tmp_path / "bare", seed=1, top1=0.5)
    assert run_costs(run) == {"trainable_params": None, "epoch_seconds": None, "train_seconds": None,
                              "peak_memory_mb": None, "best_mb": None, "weights_mb": None, "weights_file": None}


# ---------------------------------------------------------------- real k-fold runs from sweep.py


@pytest.fixture(scope="module")
def kfold_sweep(tmp_path_factory) -> Path:
    """sweep.py: 2 variants x 2 folds, one epoch; 16 train images per class so that the held-out
    fold (n_val = 32) and the shared test split (num_samples = 12) differ."""
    from conftest import TINY_ARGS, run_script

    from fgclf.data import generate_toy_cub

    tmp = tmp_path_factory.mktemp("kfold")
    root = generate_toy_cub(tmp / "toy", num_classes=4, train_per_class=16, test_per_class=3, image_size=32, seed=0)
    settings = {k.lstrip("-"): v for k, v in zip(TINY_ARGS[::2], TINY_ARGS[1::2])}
    settings.update({"data.format": "cub", "data.root": str(root), "train.epochs": 1, "optim.lr": 0.01})
    # `launch: []`: each run is a plain `python scripts/train_classifier.py` (the launcher's ~8 s per run adds
    # nothing to a statistics test; tests/scripts/test_sweep.py runs a sweep under accelerate launch)
    plan = {"name": "kfold", "launch": [], "seeds": [1], "folds": 2,
            "set": settings, "variants": {"ce": {}, "fast": {"optim.lr": 0.05}}}
    (tmp / "plan.yaml").write_text(yaml.safe_dump(plan))
    proc = run_script("sweep.py", [str(tmp / "plan.yaml"), "--output-dir", str(tmp / "out")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "out"


def test_nadeau_bengio_on_real_kfold_runs_uses_the_validation_fold(kfold_sweep):
    from fgclf.compare import compare_groups

    runs = {v: [kfold_sweep / v / f"seed1_fold{f}" for f in (0, 1)] for v in ("ce", "fast")}
    m = {v: [json.loads((r / "metrics.json").read_text()) for r in rs] for v, rs in runs.items()}
    every = m["ce"] + m["fast"]
    assert [x["fold"] for x in m["ce"]] == [0, 1] and all(x["num_folds"] == 2 for x in every)
    n_train = np.mean([x["n_train"] for x in every])
    n_val = np.mean([x["n_val"] for x in every])
    assert n_val != every[0]["num_samples"]  # else this test could not tell the two apart
    result = compare_groups({v: [str(r) for r in rs] for v, rs in runs.items()}, ["loss", "top1"])
    (comp,) = result["comparisons"]
    assert comp["paired_by"] == ["fold"] and comp["n_pairs"] == 2
    assert (comp["n_train"], comp["n_test"]) == (n_train, n_val)
    d = np.array([b["loss"] - a["loss"] for a, b in zip(m["ce"], m["fast"])])
    entry = comp["metrics"]["loss"]["corrected_ttest"]
    assert entry["correction"] == pytest.approx(1 / 2 + n_val / n_train)
    t = d.mean() / math.sqrt((1 / 2 + n_val / n_train) * d.var(ddof=1))  # Nadeau & Bengio (2003), by hand
    assert entry["t"] == pytest.approx(t, rel=1e-9) and entry["p"] == pytest.approx(2 * st.t.sf(abs(t), 1), rel=1e-9)
    # the sweep's own comparison (written by sweep.py in its process) says the same
    written = json.loads((kfold_sweep / "comparison" / "summary.json").read_text())["comparisons"][0]
    assert (written["n_train"], written["n_test"]) == (n_train, n_val)
    assert "n_test=32 (the held-out validation fold" in (kfold_sweep / "comparison" / "summary.md").read_text()
