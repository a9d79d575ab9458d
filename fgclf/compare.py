"""Compare groups of finished runs (repeated seeds or CV folds) against a baseline group.

A group is a name and a list of run directories (globs allowed). For every metric each group gets
a summary (mean, std, t and bootstrap intervals, :func:`fgclf.stats.summarize`); every other group
is compared with the first one (the baseline) on paired runs:

* runs are paired by ``seed`` (metrics.json ``seed``, else config.yaml ``run.seed``); a seed found
  in one group only is listed and left out of the paired tests;
* when the runs carry a ``fold`` key (k-fold CV) they are paired by fold (by seed and fold when a
  group repeats a fold), and the Nadeau-Bengio corrected t-test is added with ``n_train`` and
  ``n_test = n_val`` from metrics.json: the training and the held-out (validation) fold sizes of
  the resampling, so the factor is ``1/k + n_val/n_train`` (``1/k + 1/(k-1)`` for k-fold). The
  correction accounts for the folds' overlapping training sets, which is what makes their
  scores correlated; the held-out size of the resampling sets that overlap. The compared metric
  is measured on the shared test split (``num_samples``), the same images for every fold, so its
  sampling noise is common to all folds and is not in the per-fold differences at all: the
  interval covers training-set variation, not test-set sampling (McNemar tests that for two
  single runs). ``num_samples`` is therefore not the n of the correction;
* when both groups are a single run, McNemar's test compares their per-sample correctness on the
  shared test set from predictions.npz.

Small-n guards (:mod:`fgclf.stats`): the bootstrap interval of a group is given from
:data:`~fgclf.stats.BOOTSTRAP_MIN_N` runs up (the table says so below that); paired differences
that are all equal are flagged as zero variance instead of printing ``t = inf, p = 0``.

Every group also gets its cost (:func:`run_costs`): trainable parameters, seconds per epoch
(median over a run's epochs, then mean over runs), training seconds, peak process memory, and
the size of ``checkpoints/best`` and of the weights file a user must keep beside the public
backbone (the adapter of a PEFT run, the head of a cached-feature probe, else the whole model).

:func:`write_comparison` writes a summary directory: summary.md, summary.html, summary.csv, costs.csv,
summary.json and comparison.png.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fgclf.errors import UserError
from fgclf.stats import (BOOTSTRAP_MIN_N, corrected_resampled_ttest, mcnemar, paired_ttest, summarize,
                         wilcoxon_signed_rank)
from fgclf.utils import atomic_write_bytes, atomic_write_text

DEFAULT_GROUP_METRICS = ["top1", "top5", "f1_macro", "balanced_accuracy", "auroc_macro", "loss"]
SUMMARY_FIELDS = ["n", "mean", "std", "sem", "ci_lo", "ci_hi", "boot_lo", "boot_hi", "min", "max"]
PAIR_FIELDS = ["n_pairs", "diff_vs_baseline", "diff_ci_lo", "diff_ci_hi", "p_ttest", "p_wilcoxon",
               "corrected_ci_lo", "corrected_ci_hi", "p_corrected", "zero_variance"]


@dataclass(frozen=True)
class Run:
    """A finished run directory: its final metrics and the keys runs are paired on."""

    path: Path
    metrics: dict
    seed: Optional[int]
    fold: Optional[int]


def expand_runs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories from paths and glob patterns (``'runs/sweep/ce_*'``), sorted, deduplicated."""
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        text = str(pattern)
        if any(ch in text for ch in "*?["):
            paths = sorted(Path(p) for p in glob.glob(text) if Path(p).is_dir())
            if not paths:
                raise UserError(f"pattern '{text}' matches no run directory")
        else:
            paths = [Path(text)]
        for path in paths:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                out.append(path)
    return out


def _int_or_none(value: Any) -> Optional[int]:
    return None if value is None or isinstance(value, bool) else int(value)


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read ``metrics.json`` (and the seed from ``config.yaml`` when metrics.json has none)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not (path / "metrics.json").is_file():
        raise UserError(f"{path} has no metrics.json (not a finished run)")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path / 'metrics.json'} is not valid JSON ({err})") from err
    if not isinstance(metrics, dict):
        raise UserError(f"{path / 'metrics.json'} does not hold a JSON object")
    for level, values in (metrics.get("levels") or {}).items():  # coarser label levels as "<level>.<metric>"
        for key, value in values.items():
            metrics.setdefault(f"{level}.{key}", value)
    seed = metrics.get("seed")
    if seed is None and (path / "config.yaml").is_file():
        import yaml

        try:
            config = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path / 'config.yaml'} is not valid YAML ({err})") from err
        run_info = config.get("run") if isinstance(config, dict) else None
        seed = run_info.get("seed") if isinstance(run_info, dict) else None
    return Run(path, metrics, _int_or_none(seed), _int_or_none(metrics.get("fold")))


# the trained weights of a run's best/ checkpoint, smallest first: a PEFT adapter or a probe head
# needs the public backbone beside it; model.safetensors is the whole model
WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors", "model.safetensors")
COST_FIELDS = ["trainable_params", "epoch_seconds", "train_seconds", "peak_memory_mb", "best_mb", "weights_mb",
               "weights_file"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_costs(run_dir: str | os.PathLike) -> dict:
    """What one finished run cost; an entry is None where the run did not record it.

    Returns:
        ``trainable_params`` (metrics.json ``parameters.trainable``), ``epoch_seconds`` (median
        ``epoch_time`` of metrics.jsonl), ``train_seconds`` (metrics.json), ``peak_memory_mb``
        (largest ``memory_mb`` of metrics.jsonl: peak RSS on CPU, peak CUDA allocation on a GPU),
        ``best_mb`` (every file under checkpoints/best), ``weights_mb`` and ``weights_file``
        (the first of :data:`WEIGHT_FILES` found there), in MiB.
    """
    path = Path(run_dir)
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    history = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the others still count
                continue
    times = [float(h["epoch_time"]) for h in history if isinstance(h.get("epoch_time"), (int, float))]
    memory = [float(h["memory_mb"]) for h in history if isinstance(h.get("memory_mb"), (int, float))]
    params = metrics.get("parameters")
    best = path / "checkpoints" / "best"
    weights = next((best / name for name in WEIGHT_FILES if (best / name).is_file()), None)
    mib = 2.0 ** 20
    return {"trainable_params": params.get("trainable") if isinstance(params, dict) else None,
            "epoch_seconds": float(np.median(times)) if times else None,
            "train_seconds": metrics.get("train_seconds"),
            "peak_memory_mb": max(memory) if memory else None,
            "best_mb": _dir_bytes(best) / mib if best.is_dir() else None,
            "weights_mb": weights.stat().st_size / mib if weights is not None else None,
            "weights_file": weights.name if weights is not None else None}


def group_costs(runs: Sequence[Run]) -> dict:
    """:func:`run_costs` over a group: means over runs (max for memory); None when no run has it."""
    costs = [run_costs(run.path) for run in runs]
    out: dict[str, Any] = {"n": len(runs)}
    for key in COST_FIELDS:
        values = [c[key] for c in costs if c[key] is not None]
        if key == "weights_file":
            out[key] = "/".join(sorted(set(values))) or None
        elif not values:
            out[key] = None
        elif key == "peak_memory_mb":
            out[key] = max(values)
        else:
            out[key] = float(np.mean(values))
    return out


def metric_values(runs: Sequence[Run], metric: str) -> list[float]:
    """``metric`` of every run as floats; a missing or non-numeric entry is a UserError."""
    values = []
    for run in runs:
        if metric not in run.metrics:
            numeric = sorted(k for k, v in run.metrics.items() if isinstance(v, (int, float)))
            raise UserError(f"{run.path / 'metrics.json'} has no '{metric}' (numeric keys: {', '.join(numeric)})")
        value = run.metrics[metric]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"'{metric}' of {run.path} is not a number ({value!r})")
        values.append(float(value))
    return values


def _label(fields: Sequence[str], key: Sequence[Any]) -> str:
    return " ".join(f"{f} {k}" for f, k in zip(fields, key))


def pairing_fields(groups: Mapping[str, Sequence[Run]]) -> tuple[str, ...]:
    """``("seed",)``, or ``("fold",)`` / ``("seed", "fold")`` when the runs are CV folds."""
    runs = [run for rs in groups.values() for run in rs]
    without = [run for run in runs if run.fold is None]
    if len(without) == len(runs):
        return ("seed",)
    if without:
        raise UserError(f"{without[0].path} has no 'fold' in metrics.json but other runs do; "
                        "compare cross-validation runs only with cross-validation runs")
    repeated = any(len({run.fold for run in rs}) < len(rs) for rs in groups.values())
    return ("seed", "fold") if repeated else ("fold",)


def pair_runs(base: Sequence[Run], other: Sequence[Run], *, by: Sequence[str], names: tuple[str, str]) -> dict:
    """Match the runs of two groups on the fields ``by``.

    Returns:
        ``pairs`` (sorted list of ``(key, base_run, other_run)``) and ``unpaired`` (one dict per
        run left out: group, run, key label, reason).
    """
    tables, unpaired = [], []
    for group, runs in zip(names, (base, other)):
        table: dict[tuple, Run] = {}
        for run in runs:
            key = tuple(getattr(run, f) for f in by)
            if None in key:
                unpaired.append({"group": group, "run": str(run.path), "key": None,
                                 "reason": f"no {' and '.join(by)} recorded"})
            elif key in table:
                raise UserError(f"{table[key].path} and {run.path} of group '{group}' both have "
                                f"{_label(by, key)}; cannot pair them")
            else:
                table[key] = run
        tables.append(table)
    shared = sorted(set(tables[0]) & set(tables[1]))
    for group, table, other_name in ((names[0], tables[0], names[1]), (names[1], tables[1], names[0])):
        for key in sorted(set(table) - set(shared)):
            unpaired.append({"group": group, "run": str(table[key].path), "key": _label(by, key),
                             "reason": f"{_label(by, key)} only in {group}, not in {other_name}"})
    return {"pairs": [(key, tables[0][key], tables[1][key]) for key in shared], "unpaired": unpaired}


def _cv_sizes(runs: Sequence[Run]) -> tuple[Optional[tuple[float, float]], Optional[str]]:
    """Mean (n_train, n_val) of CV runs, or a note saying why the corrected test is skipped.

    ``n_val`` (the held-out fold), not ``num_samples`` (the shared test split), is the n_test of
    Nadeau & Bengio: see the module docstring.
    """
    for run in runs:
        for key in ("n_train", "n_val"):
            value = run.metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                return None, f"corrected t-test skipped: {run.path / 'metrics.json'} has no positive '{key}'"
    n_train = float(np.mean([run.metrics["n_train"] for run in runs]))
    n_val = float(np.mean([run.metrics["n_val"] for run in runs]))
    return (n_train, n_val), None


def _compare_pair(base_name: str, base: Sequence[Run], name: str, runs: Sequence[Run], metrics: Sequence[str],
                  fields: Sequence[str], confidence: float, notes: list[str]) -> dict:
    """Paired tests of group ``name`` against the baseline (differences are group - baseline)."""
    if len(base) == len(runs) == 1:  # two single runs: their difference (McNemar tests it), seeds aside
        pairing = {"pairs": [((), base[0], runs[0])], "unpaired": []}
        fields = []
    else:
        pairing = pair_runs(base, runs, by=fields, names=(base_name, name))
    pairs = pairing["pairs"]
    out = {"group": name, "baseline": base_name, "paired_by": list(fields), "n_pairs": len(pairs),
           "paired_keys": [_label(fields, key) for key, _, _ in pairs], "unpaired": pairing["unpaired"],
           "n_train": None, "n_test": None, "metrics": {}}
    if not pairs:
        notes.append(f"{name} vs {base_name}: no shared {' and '.join(fields)}; no paired tests")
        return out
    sizes = None
    if "fold" in fields:
        sizes, why = _cv_sizes([run for _, a, b in pairs for run in (a, b)])
        if why:
            notes.append(f"{name} vs {base_name}: {why}")
        else:
            out["n_train"], out["n_test"] = sizes
    for metric in metrics:
        ours = metric_values([run for _, _, run in pairs], metric)
        theirs = metric_values([run for _, run, _ in pairs], metric)
        entry = {"ttest": paired_ttest(ours, theirs, confidence=confidence),
                 "wilcoxon": wilcoxon_signed_rank(ours, theirs)}
        if sizes:
            entry["corrected_ttest"] = corrected_resampled_ttest(ours, theirs, n_train=sizes[0], n_test=sizes[1],
                                                                 confidence=confidence)
        out["metrics"][metric] = entry
    return out


def _load_predictions(run: Run) -> Optional[dict]:
    path = run.path / "predictions.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            scores = data["logits"] if "logits" in data else data["probs"]
            ids = np.asarray(data["image_ids"]).astype(np.str_) if "image_ids" in data else None
            return {"labels": np.asarray(data["labels"]), "pred": np.asarray(scores).argmax(axis=1), "ids": ids}
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path} is not a readable predictions file ({err})") from err


def mcnemar_runs(base: Run, other: Run, *, exact: Optional[bool] = None) -> Optional[dict]:
    """McNemar's test of two runs' top-1 correctness on the same test set (``None``: no predictions).

    Raises:
        UserError: the two predictions.npz files hold different test sets (labels or image_ids).
    """
    pa, pb = _load_predictions(base), _load_predictions(other)
    if pa is None or pb is None:
        return None
    where = f"{base.path} and {other.path} were not evaluated on the same test set"
    if pa["labels"].shape != pb["labels"].shape:
        raise UserError(f"{where}: {pa['labels'].size} vs {pb['labels'].size} samples")
    if (pa["ids"] is None) != (pb["ids"] is None):
        raise UserError(f"{where}: only one predictions.npz stores image_ids, so the sample order cannot be checked")
    if pa["ids"] is not None and not np.array_equal(pa["ids"], pb["ids"]):
        raise UserError(f"{where}: image_ids differ at {int(np.count_nonzero(pa['ids'] != pb['ids']))} samples")
    if not np.array_equal(pa["labels"], pb["labels"]):
        raise UserError(f"{where}: labels differ at {int(np.count_nonzero(pa['labels'] != pb['labels']))} samples")
    result = mcnemar(pa["pred"] == pa["labels"], pb["pred"] == pb["labels"], exact=exact)
    return {"baseline_run": str(base.path), "run": str(other.path), "ids_checked": pa["ids"] is not None, **result}


def compare_groups(groups: Mapping[str, Sequence[str | os.PathLike]], metrics: Optional[Sequence[str]] = None, *,
                   confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> dict:
    """Summaries per group and metric, and paired tests of every group against the first one.

    Args:
        groups: group name -> run directories or glob patterns; the first group is the baseline.
        metrics: metrics.json keys to compare; every run must have them. ``None``: those of
            ``DEFAULT_GROUP_METRICS`` that every run has.
        confidence: coverage of every interval.
        n_boot: bootstrap resamples of the per-group mean.
        seed: bootstrap seed.
    Returns:
        A JSON-able dict: ``baseline, metrics, confidence, n_boot, bootstrap_seed, paired_by,
        groups`` (runs with seed/fold), ``summaries`` (one per metric x group), ``comparisons``
        (one per non-baseline group), ``mcnemar`` (single-run groups) and ``notes``.
    """
    if not groups:
        raise UserError("no groups to compare")
    loaded = {}
    for name, patterns in groups.items():
        loaded[name] = [load_run(path) for path in expand_runs(patterns)]
        if not loaded[name]:
            raise UserError(f"group '{name}' has no run directories")
    fields = pairing_fields(loaded)
    names = list(loaded)
    base = names[0]
    notes: list[str] = []
    if metrics is None:
        every = [run for rs in loaded.values() for run in rs]
        metrics = [m for m in DEFAULT_GROUP_METRICS if all(m in run.metrics for run in every)]
        if not metrics:
            raise UserError(f"the runs share none of {', '.join(DEFAULT_GROUP_METRICS)}; choose --metrics")
    summaries = [{"metric": m, "group": g, **summarize(metric_values(loaded[g], m), confidence=confidence,
                                                        n_boot=n_boot, seed=seed)}
                 for m in metrics for g in names]
    comparisons = [_compare_pair(base, loaded[base], g, loaded[g], metrics, fields, confidence, notes)
                   for g in names[1:]]
    tests = []
    for g in names[1:]:
        if len(loaded[base]) == 1 and len(loaded[g]) == 1:
            res = mcnemar_runs(loaded[base][0], loaded[g][0])
            if res is None:
                notes.append(f"McNemar {g} vs {base} skipped: a run has no predictions.npz")
            else:
                tests.append({"group": g, "baseline": base, **res})
                if not res["ids_checked"]:
                    notes.append(f"McNemar {g} vs {base}: labels match; no image_ids stored, same order assumed")
    return {"baseline": base, "metrics": list(metrics), "confidence": confidence, "n_boot": n_boot,
            "bootstrap_seed": seed, "paired_by": list(fields),
            "groups": {g: [{"run": str(r.path), "seed": r.seed, "fold": r.fold} for r in rs]
                       for g, rs in loaded.items()},
            "summaries": summaries, "comparisons": comparisons, "mcnemar": tests,
            "costs": {g: group_costs(rs) for g, rs in loaded.items()}, "notes": notes}


def _pair_row(result: dict, group: str, metric: str) -> list[Any]:
    """The PAIR_FIELDS cells of one summary.csv row (blank for the baseline)."""
    comp = next((c for c in result["comparisons"] if c["group"] == group), None)
    if comp is None:
        return [""] * len(PAIR_FIELDS)
    entry = comp["metrics"].get(metric)
    if entry is None:
        return [comp["n_pairs"]] + [""] * (len(PAIR_FIELDS) - 1)
    t, corrected = entry["ttest"], entry.get("corrected_ttest") or {}
    return [comp["n_pairs"], t["mean_diff"], t["ci_lo"], t["ci_hi"], t["p"], entry["wilcoxon"]["p"],
            *(corrected.get(k, "") for k in ("ci_lo", "ci_hi", "p")), int(bool(t.get("zero_variance")))]


def summary_csv(result: dict) -> str:
    """summary.csv: one row per group x metric, with the paired columns against the baseline."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "metric", *SUMMARY_FIELDS, *PAIR_FIELDS])
    for s in result["summaries"]:
        writer.writerow([s["group"], s["metric"], *(repr(s[f]) if isinstance(s[f], float) else s[f]
                                                     for f in SUMMARY_FIELDS),
                         *(repr(v) if isinstance(v, float) else v for v in _pair_row(result, s["group"], s["metric"]))])
    return buf.getvalue()


def plot_comparison(result: dict, path: str | os.PathLike) -> None:
    """comparison.png: one panel per metric, a bar per group (mean, t-CI error bar) and run dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics, groups = result["metrics"], list(result["groups"])
    fig = Figure(figsize=(max(3.0, 0.8 * len(groups) + 1.5) * len(metrics), 3.8))
    for index, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(1, len(metrics), index)
        rows = [s for s in result["summaries"] if s["metric"] == metric]
        x = np.arange(len(rows))
        means = np.array([s["mean"] for s in rows])
        err = np.array([[s["mean"] - s["ci_lo"], s["ci_hi"] - s["mean"]] for s in rows]).T
        ax.bar(x, means, yerr=np.nan_to_num(err), capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, s in enumerate(rows):
            ax.plot(np.full(len(s["values"]), i), s["values"], "o", color="black", markersize=3, alpha=0.6)
        ax.set_xticks(x, [s["group"] for s in rows], rotation=30, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"mean over runs, {result['confidence']:.0%} t-interval; dots: runs")
    fig.tight_layout()
    # the same Agg-canvas rendering as fgclf.report._save_figure, without importing torch through it
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _num(x: Any, digits: int = 4) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def _p(x: Optional[float]) -> str:
    return "" if x is None else ("nan" if math.isnan(x) else f"{x:.3g}")


# The cells of summary.md's tables, shared with summary.html (fgclf.compare_html): both show the same strings.


def intervals_text(result: dict) -> str:
    """The sentence saying what the intervals are."""
    return (f"Intervals are {result['confidence']:.0%} intervals of the mean over runs: Student t, and percentile "
            f"bootstrap ({result['n_boot']} resamples, seed {result['bootstrap_seed']}; only from {BOOTSTRAP_MIN_N} "
            "runs up: with fewer the percentile bootstrap is too narrow, with 3 runs it is exactly [min, max]).")


def runs_text(runs: Sequence[dict]) -> str:
    """A group's runs with their seed and fold: ``3 runs: ce_s1 (seed 1); ...``."""
    keys = [", ".join(f"{k} {r[k]}" for k in ("seed", "fold") if r[k] is not None) or "no seed" for r in runs]
    return f"{len(runs)} run{'s' * (len(runs) != 1)}: " + "; ".join(f"{Path(r['run']).name} ({k})"
                                                                    for r, k in zip(runs, keys))


def summary_head(pct: str) -> list[str]:
    return ["metric", "group", "n", "mean ± std", f"{pct} t-CI", f"{pct} bootstrap CI", "min", "max"]


def summary_cells(s: dict) -> list[str]:
    """One row of the per-group table (:func:`summary_head`)."""
    boot = (f"n/a (n < {BOOTSTRAP_MIN_N})" if s.get("boot_note") else
            f"[{_num(s['boot_lo'])}, {_num(s['boot_hi'])}]")
    return [s["metric"], s["group"], str(s["n"]), f"{_num(s['mean'])} ± {_num(s['std'])}",
            f"[{_num(s['ci_lo'])}, {_num(s['ci_hi'])}]", boot, _num(s["min"]), _num(s["max"])]


def comparison_section(comp: dict, pct: str) -> dict:
    """One group against the baseline: ``title``, ``text`` (the lines above its table), ``head`` and
    ``rows`` of the table (empty when there is nothing paired), ``notes`` (what its (!) and (z) mean)."""
    by = " and ".join(comp["paired_by"])
    text = []
    if by:
        text.append(f"Paired by {by}: {comp['n_pairs']} pair{'s' * (comp['n_pairs'] != 1)} "
                    f"({', '.join(comp['paired_keys']) or 'none'}).")
    text += [f"Left out: {u['run']} ({u['reason']})." for u in comp["unpaired"]]
    out = {"title": f"{comp['group']} - {comp['baseline']}", "text": text, "head": [], "rows": [], "notes": []}
    if not comp["metrics"]:
        return out
    if comp["n_pairs"] < 2:
        text.append("One run each: differences only (a paired test needs at least 2 pairs; McNemar below "
                    "tests top-1 per sample)." if not by else "One pair: differences only, no paired test.")
        out.update(head=["metric", "difference"],
                   rows=[[m, f"{e['ttest']['mean_diff']:+.4f}"] for m, e in comp["metrics"].items()])
        return out
    cv = comp["n_train"] is not None
    if cv:
        text.append(f"Folds share training data, so the plain paired t-test is too optimistic; the corrected "
                    f"t-test (Nadeau & Bengio 2003) uses n_train={comp['n_train']:g} (training images per fold) "
                    f"and n_test={comp['n_test']:g} (the held-out validation fold, n_val; not the shared test "
                    "split, whose images are the same for every fold).")
    out["head"] = ["metric", "pairs", "mean diff", f"{pct} CI" + (" (corrected)" if cv else ""), "paired t p",
                   "Wilcoxon p"] + (["corrected t p"] if cv else [])
    warnings, flat = [], []
    for metric, entry in comp["metrics"].items():
        t, w = entry["ttest"], entry["wilcoxon"]
        ci = entry["corrected_ttest"] if cv else t
        zero = bool(t.get("zero_variance"))
        if zero:
            flat.append(f"{metric} ({t['mean_diff']:+.4g} in every pair)")
        ci_cell = "zero variance (z)" if zero else f"[{_num(ci['ci_lo'])}, {_num(ci['ci_hi'])}]"
        p_cell = "zero variance (z)" if zero else _p(t["p"])
        cells = [metric, str(t["n"]), f"{t['mean_diff']:+.4f}", ci_cell, p_cell,
                 _p(w["p"]) + (" (!)" if w["warning"] else "")]
        if cv:
            cells.append(p_cell if zero else _p(entry["corrected_ttest"]["p"]))
        out["rows"].append(cells)
        if w["warning"] and w["warning"] not in warnings:
            warnings.append(w["warning"])
    out["notes"] = [f"(!) {text}." for text in warnings]
    if flat:
        out["notes"].append(f"(z) every paired difference is the same for {', '.join(flat)}: zero variance, so no "
                            "t-test p-value or interval (scipy would print t = inf, p = 0, which only says the runs "
                            "did not vary); more seeds or folds are needed.")
    return out


def mcnemar_text(base: str) -> str:
    return (f"b: {base} right, group wrong; c: group right, {base} wrong. Exact binomial test below 25 "
            "discordant samples, else chi-square with continuity correction.")


MCNEMAR_HEAD = ["group", "samples", "top1 baseline", "top1 group", "b", "c", "test", "statistic", "p"]


def mcnemar_cells(m: dict) -> list[str]:
    """One row of the McNemar table (:data:`MCNEMAR_HEAD`)."""
    return [m["group"], str(m["n"]), _num(m["acc_a"]), _num(m["acc_b"]), str(m["b"]), str(m["c"]),
            "exact" if m["exact"] else "chi-square", f"{m['statistic']:.4g}", _p(m["p"])]


COST_TEXT = ("Means over the group's runs (peak memory: the largest). Seconds per epoch: each run's median epoch. "
             "Peak memory: process peak RSS on CPU (interpreter and libraries included), peak CUDA allocation on a "
             "GPU. Weights: the file to keep beside the public backbone (adapter, probe head) or the whole model.")
COST_HEAD = ["group", "trainable params", "s/epoch", "train s", "peak memory MiB", "best/ MiB", "weights MiB (file)"]


def cost_cells(group: str, c: dict) -> list[str]:
    """One row of the cost table (:data:`COST_HEAD`); blank where no run recorded it."""
    def cell(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    weights = f"{cell(c['weights_mb'], '.2f')} ({c['weights_file']})" if c["weights_file"] else ""
    return [group, cell(c["trainable_params"], ",.0f"), cell(c["epoch_seconds"], ".2f"),
            cell(c["train_seconds"], ".0f"), cell(c["peak_memory_mb"], ",.0f"), cell(c["best_mb"], ".2f"), weights]


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _comparison_lines(comp: dict, pct: str) -> list[str]:
    """The summary.md section of one group against the baseline."""
    sec = comparison_section(comp, pct)
    lines = [f"### {sec['title']}", "", *sec["text"]]
    if sec["rows"]:
        lines += ["", _md_row(sec["head"]), "|---|" + "---:|" * (len(sec["head"]) - 1), *map(_md_row, sec["rows"])]
    return lines + [""] + (sec["notes"] + [""] if sec["notes"] else [])


def costs_csv(result: dict) -> str:
    """costs.csv: one row per group with :data:`COST_FIELDS`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "n", *COST_FIELDS])
    for g, c in (result.get("costs") or {}).items():
        writer.writerow([g, c["n"], *("" if c[k] is None else c[k] for k in COST_FIELDS)])
    return buf.getvalue()


def format_markdown(result: dict) -> str:
    """The text of summary.md: per-group summaries, paired comparisons, McNemar, notes, plot."""
    pct = f"{result['confidence']:.0%}"
    base = result["baseline"]
    lines = [f"# Comparison of {len(result['groups'])} groups (baseline: {base})", ""]
    lines += [f"- **{g}**: {runs_text(runs)}" for g, runs in result["groups"].items()]
    lines += ["", intervals_text(result) + " Files: [summary.csv](summary.csv), [summary.json](summary.json).", "",
              "## Per group", "", _md_row(summary_head(pct)), "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_md_row(summary_cells(s)) for s in result["summaries"]]
    if result["comparisons"]:
        lines += ["", f"## Paired differences against {base} (group - baseline)", ""]
        for comp in result["comparisons"]:
            lines += _comparison_lines(comp, pct)
    if result["mcnemar"]:
        lines += ["## McNemar on the shared test set (top-1 correctness per sample)", "", mcnemar_text(base), "",
                  _md_row(MCNEMAR_HEAD), "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        lines += [_md_row(mcnemar_cells(m)) for m in result["mcnemar"]] + [""]
    if result.get("costs"):
        lines += ["## Cost per group", "", COST_TEXT, "", _md_row(COST_HEAD), "|---|---:|---:|---:|---:|---:|---|"]
        lines += [_md_row(cost_cells(g, c)) for g, c in result["costs"].items()] + [""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    lines += ["![Means with t-intervals per metric](comparison.png)"]
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, output_dir: str | os.PathLike) -> Path:
    """Write summary.json, summary.csv, costs.csv, comparison.png, summary.md and summary.html (the same
    tables and the plot inlined in one self-contained page, :mod:`fgclf.compare_html`) into ``output_dir``."""
    from fgclf.compare_html import comparison_html

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "summary.csv", summary_csv(result))
    atomic_write_text(out / "costs.csv", costs_csv(result))
    plot_comparison(result, out / "comparison.png")
    atomic_write_text(out / "summary.md", format_markdown(result))
    atomic_write_text(out / "summary.html", comparison_html(result, out / "comparison.png"))
    return out
