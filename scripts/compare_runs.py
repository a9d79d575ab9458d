#!/usr/bin/env python
r"""Compare finished runs: a side-by-side table, or groups of repeated runs with statistics.

One row per run, its final test metrics as columns (prints a Markdown table; --output FILE.md writes
it there and as a sortable page beside it, FILE.html):

    python scripts/compare_runs.py runs/demo/finetune runs/demo/scratch
    python scripts/compare_runs.py runs/demo/* --metrics top1 f1_macro --output runs/demo/summary.md

Groups of runs (seeds or CV folds; the first group is the baseline; quoted globs are expanded):

    python scripts/compare_runs.py --group ce runs/ce_s1 runs/ce_s2 runs/ce_s3 \
        --group focal runs/focal_s1 runs/focal_s2 runs/focal_s3 \
        --metrics top1 f1_macro --output-dir runs/compare_losses
    python scripts/compare_runs.py --group ce 'runs/sweep/ce_*' --group focal 'runs/sweep/focal_*'

writes summary.md, summary.html (the same tables and the plot in one self-contained page),
summary.csv, costs.csv, summary.json and comparison.png into --output-dir (default
runs/compare_<groups>_<time>): per group mean +- std with a t interval, and a percentile bootstrap
interval from 10 runs up (with fewer it is too narrow; with 3 runs it is exactly [min, max]);
against the baseline, paired by seed (by fold for CV runs): mean difference with its interval,
paired t-test, Wilcoxon signed-rank (warns when too few pairs can ever be significant), the
Nadeau-Bengio corrected t-test for CV folds, and McNemar's test when each group is a single run.
Paired differences that are all equal are flagged "zero variance" instead of printing p = 0.

The corrected t-test uses n_train and n_test = n_val of metrics.json: the training and held-out
(validation) fold sizes of the k-fold resampling, factor 1/k + n_val/n_train. The compared
metrics are measured on the shared test split, the same images for every fold, so its size
(num_samples) is not the n of the correction and its sampling noise is not in the interval.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclf.compare import DEFAULT_GROUP_METRICS, compare_groups, format_markdown, write_comparison  # noqa: E402
from fgclf.compare_html import table_html  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import default_run_name, script_main  # noqa: E402
from fgclf.utils import atomic_write_text  # noqa: E402

DEFAULT_METRICS = ["top1", "top5", "f1_macro", "auroc_macro", "loss", "best_epoch", "train_seconds"]


def table_cells(run_dirs: list[Path], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """The run table's header and one row of cells per run: run | model | method | trains | metrics."""
    rows = []
    for run in run_dirs:
        path = run / "metrics.json"
        if not path.is_file():
            raise UserError(f"{run} has no metrics.json (not a finished run)")
        m = json.loads(path.read_text())
        trains = m.get("peft") if m.get("peft") not in (None, "none") else m.get("strategy", "")
        cells = []
        for key in metrics:
            value = m.get(key)
            if isinstance(value, float):
                cells.append("nan" if math.isnan(value) else (f"{value:.1f}" if key == "train_seconds" else f"{value:.4f}"))
            else:
                cells.append("" if value is None else str(value))
        rows.append([run.name, str(m.get("model", "")), str(m.get("method", "plain")), str(trains), *cells])
    return ["run", "model", "method", "trains", *metrics], rows


def comparison_table(head: list[str], rows: list[list[str]]) -> str:
    """The Markdown table of :func:`table_cells` (the HTML one is :func:`fgclf.compare_html.table_html`)."""
    lines = ["| " + " | ".join(cells) + " |" for cells in (head, *rows)]
    return "\n".join([lines[0], "|---|---|---|---|" + "---:|" * (len(head) - 4), *lines[1:]]) + "\n"


def _groups(specs: list[list[str]]) -> dict[str, list[str]]:
    """``--group NAME RUN...`` occurrences as an ordered name -> runs mapping."""
    groups: dict[str, list[str]] = {}
    for name, *runs in specs:
        if name in groups:
            raise UserError(f"group name '{name}' is given twice")
        if not runs:
            raise UserError(f"--group {name} names no run directories (use --group NAME RUN [RUN ...])")
        if Path(name, "metrics.json").is_file():
            raise UserError(f"group name '{name}' is a run directory; use --group NAME RUN [RUN ...]")
        groups[name] = runs
    return groups


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (side-by-side table)")
    parser.add_argument("--group", nargs="+", action="append", metavar=("NAME", "RUN"),
                        help="a named group of run directories or quoted glob patterns; repeat per group")
    parser.add_argument("--metrics", nargs="+",
                        help=f"metrics.json keys (table default: {' '.join(DEFAULT_METRICS)}; "
                             f"groups: those of {' '.join(DEFAULT_GROUP_METRICS)} that every run has)")
    parser.add_argument("--output", type=Path,
                        help="table mode: also write the table to this Markdown file and as HTML beside it (.html)")
    parser.add_argument("--output-dir", type=Path, help="group mode: summary directory (default runs/compare_...)")
    parser.add_argument("--confidence", type=float, default=0.95, help="coverage of every interval")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.group):
        raise UserError("give either run directories (table) or --group NAME RUN ... (statistics), not both"
                        if args.runs else "nothing to compare: give run directories or --group NAME RUN ...")
    if args.runs:
        if args.output_dir:
            raise UserError("--output-dir is for --group comparisons; the run table is written with --output FILE")
        if args.output and args.output.suffix == ".html":
            raise UserError("--output is the Markdown file (FILE.md); the HTML table is written beside it")
        head, rows = table_cells(args.runs, args.metrics or DEFAULT_METRICS)
        table = comparison_table(head, rows)
        print(table, end="")
        if args.output:
            atomic_write_text(args.output, table)
            atomic_write_text(args.output.with_suffix(".html"), table_html(head, rows, title=args.output.stem))
        return 0
    if args.output:
        raise UserError("--output is for the run table; --group comparisons are written with --output-dir DIR")
    if not 0 < args.confidence < 1 or args.n_boot < 1:
        raise UserError("--confidence must lie in (0, 1) and --n-boot be at least 1")
    groups = _groups(args.group)
    result = compare_groups(groups, args.metrics, confidence=args.confidence,
                            n_boot=args.n_boot, seed=args.seed)
    out = write_comparison(result, args.output_dir or Path("runs") / default_run_name("compare", *groups))
    print(format_markdown(result), end="")
    print(f"\nwritten to {out}/ (summary.md, summary.html, summary.csv, costs.csv, summary.json, comparison.png)")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
