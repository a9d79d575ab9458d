#!/usr/bin/env python
"""(Re)write a finished run's report.html: metrics, curves, confusion matrix, the sortable
per-class table, the most confused class pairs with example test images, and the misclassified
images, in one self-contained file.

    python scripts/report.py runs/cub_r50 [--pairs 8] [--gallery 24]

The example images are read from the run's dataset (config.yaml's ``data`` section); when it is not
where the run found it, the page is written without them and the command says so.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import ArgumentParser, script_main  # noqa: E402


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("run", type=Path, help="a finished run directory")
    p.add_argument("--pairs", type=int, default=8, help="most confused class pairs shown (default: %(default)s)")
    p.add_argument("--gallery", type=int, default=24, help="misclassified images shown (default: %(default)s)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("metrics.json", "predictions.npz"):
        if not (args.run / name).is_file():
            raise UserError(f"{args.run} has no {name}: not a finished run")
    if args.pairs < 0 or args.gallery < 0:
        raise UserError("--pairs and --gallery must be >= 0")
    from fgclf.report_html import run_test_paths, write_html_report

    paths = None
    try:
        paths = run_test_paths(args.run)
    except (UserError, OSError) as err:
        print(f"note: the run's test images are not available ({str(err)[:200]}); the report has no example images")
    path = write_html_report(args.run, paths, pairs=args.pairs, gallery=args.gallery)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
