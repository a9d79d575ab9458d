#!/usr/bin/env python
"""Compare finished runs side by side: one row per run, its final test metrics as columns.

    python scripts/compare_runs.py runs/demo/finetune runs/demo/scratch
    python scripts/compare_runs.py runs/demo/* --metrics top1 f1_macro --output runs/demo/summary.md

Reads each run directory's metrics.json; prints a Markdown table (and writes it with --output).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import script_main  # noqa: E402
from fgclf.utils import atomic_write_text  # noqa: E402

DEFAULT_METRICS = ["top1", "top5", "f1_macro", "auroc_macro", "loss", "best_epoch", "train_seconds"]


def comparison_table(run_dirs: list[Path], metrics: list[str]) -> str:
    """A Markdown table: run | model | strategy/peft | metric columns."""
    rows = ["| run | model | method | " + " | ".join(metrics) + " |",
            "|---|---|---|" + "---:|" * len(metrics)]
    for run in run_dirs:
        path = run / "metrics.json"
        if not path.is_file():
            raise UserError(f"{run} has no metrics.json (not a finished run)")
        m = json.loads(path.read_text())
        method = m.get("peft") if m.get("peft") not in (None, "none") else m.get("strategy", "")
        cells = []
        for key in metrics:
            value = m.get(key)
            if isinstance(value, float):
                cells.append("nan" if math.isnan(value) else (f"{value:.1f}" if key == "train_seconds" else f"{value:.4f}"))
            else:
                cells.append("" if value is None else str(value))
        rows.append(f"| {run.name} | {m.get('model', '')} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS, help="metrics.json keys to show")
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    table = comparison_table(args.runs, args.metrics)
    print(table, end="")
    if args.output:
        atomic_write_text(args.output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
