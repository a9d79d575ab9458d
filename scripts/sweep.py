#!/usr/bin/env python
"""Run a sweep plan (variants x seeds x folds) and write the statistical comparison.

    python scripts/sweep.py configs/sweep_toy_tricks.yaml              # run (skips finished runs)
    python scripts/sweep.py configs/sweep_toy_tricks.yaml --dry-run    # print the commands only
    python scripts/sweep.py configs/sweep_toy_tricks.yaml --output-dir runs/my_sweep
    python scripts/sweep.py configs/sweep_toy_tricks.yaml --executor parallel --parallel 8   # 8 runs at once

Executors (``--executor``, or ``executor:`` in the plan; the command line wins): ``local`` runs one
run after another (the default); ``parallel`` runs ``--parallel N`` at once on this node, each with
its own ``CUDA_VISIBLE_DEVICES`` of ``--gpus-per-run`` GPUs (on a machine without GPUs: an equal
share of the cores as ``OMP_NUM_THREADS``) and its output in ``<run>/sweep.log``; a failed run is
reported and the others go on; the summary is the same as with ``local``. ``slurm`` submits one
submitit job per run (``executor: {name: slurm, partition: gpu, time_min: 240, nodes: 1,
gpus_per_node: 4, cpus_per_task: 16, mem_gb: 64, account: lab, max_retries: 2}`` in the plan; the
plan's ``launch`` gives each job's ``accelerate launch`` settings): timed-out or preempted jobs are
requeued and a failed job is submitted again, each resuming from its last checkpoint; ``cluster:
local`` runs the jobs as local processes. The comparison is written when the last run finishes.

    python scripts/sweep.py PLAN --status    # each run: done / partial / todo, and its last job
    python scripts/sweep.py PLAN --report    # the comparison of the finished runs, nothing run

Search (``search:`` in the plan, fgclf/search.py): Optuna trials over a space of config keys,
pruned on the validation metric each epoch, the study in ``<out>/search/study.db`` (a stopped
search continues); then ``baseline`` and ``best_trial<N>`` run over the plan's seeds and are
compared. Several workers share the study: ``--executor parallel`` runs that many trials at once,
the slurm executor submits ``search: {workers: N}`` jobs, and ``--search-only`` adds a worker
from another shell or node (it runs trials, then exits; the sweep that is not ``--search-only``
waits for every trial before it picks the best).

Repeated seeds of one config are a plan with one variant; k-fold CV is ``folds: k``. Each
run is an ``accelerate launch`` of scripts/train_classifier.py with the plan's launch
arguments; the summary (mean, std, t and bootstrap intervals per variant, paired tests
against the first variant) lands in <output-dir>/comparison/ as summary.md/.html/.csv/.json,
costs.csv and comparison.png (summary.html: the tables and the plot in one self-contained
page). Re-running skips finished runs and resumes interrupted ones. Runs go seed by seed
(every variant's seed 1, then seed 2, ...), so a sweep stopped half-way is still a paired
comparison on the seeds it finished.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import script_main  # noqa: E402
from fgclf.sweep import (check_unchanged, execute, expand, load_plan, prepare, print_status,  # noqa: E402
                         resolve_executor, run_slots, status)


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path, help="sweep plan YAML")
    parser.add_argument("--output-dir", type=Path, help="default: runs/<plan name>")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and commands, run nothing")
    parser.add_argument("--metrics", nargs="+", help="metrics to compare (default: the standard set)")
    parser.add_argument("--executor", help="local (one run at a time, the default) or parallel")
    parser.add_argument("--parallel", type=int, help="executor parallel: runs at once (default 2)")
    parser.add_argument("--gpus-per-run", type=int, help="executor parallel: GPUs given to each run (default 1)")
    parser.add_argument("--status", action="store_true", help="print each run's state and exit")
    parser.add_argument("--report", action="store_true", help="write the comparison of the finished runs and exit")
    parser.add_argument("--search-only", action="store_true",
                        help="a search plan: run trials of its study (beside other workers) and exit")
    args = parser.parse_args(argv)

    plan = load_plan(args.plan)
    executor = resolve_executor(plan, name=args.executor, parallel=args.parallel, gpus_per_run=args.gpus_per_run)
    slots = None
    if executor["name"] == "parallel":
        import torch

        slots = run_slots(executor["parallel"], executor["gpus_per_run"], torch.cuda.device_count())
    out = args.output_dir or Path("runs") / plan["name"]
    if args.search_only and "search" not in plan:
        raise UserError(f"--search-only: {args.plan} has no search section")
    if "search" in plan:  # Optuna's trials first, then baseline and the best trial over the seeds
        from fgclf.search import best_trial, run_search, seeded_plan, study_status

        if "workers" in plan["search"] and executor["name"] != "slurm":
            raise UserError("search workers is the slurm executor's number of search jobs; on one node use --executor "
                            "parallel --parallel N, or start sweep.py --search-only beside this one")
        if executor["name"] == "slurm" and int(executor.get("nodes", 1)) > 1:
            raise UserError("a search worker runs its trials on one node: executor nodes must be 1 for a search")
        if args.search_only and executor["name"] == "slurm":
            raise UserError("--search-only runs trials here; with the slurm executor the workers are jobs "
                            "(search: {workers: N})")
        if not (args.status or args.report or args.dry_run):
            from fgclf.search import open_study

            open_study(plan, out.resolve())  # a bad storage or a changed plan: one line, before anything runs
            if args.search_only:  # a worker joins a started search: the sweep itself runs the prepare steps
                missing = [n for n in (plan.get("prepare") or {}) if not (out / ".prepare" / f"{n}.json").is_file()]
                if missing:
                    raise UserError(f"--search-only joins a started search; prepare step(s) {', '.join(missing)} "
                                    f"have not finished in {out}: start the sweep without --search-only first")
            else:
                prepare(plan, out, repo=REPO)
            if executor["name"] == "slurm":
                from fgclf.sweep_slurm import execute_search_slurm

                execute_search_slurm(plan, out_dir=out.resolve(), repo=REPO, options=executor)
                found = best_trial(plan, out.resolve()) is not None
            else:
                found = run_search(plan, out.resolve(), repo=REPO, slots=slots, wait=not args.search_only) is not None
            if args.search_only:
                print(study_status(plan, out.resolve()), flush=True)
                return 0
            if not found:
                raise UserError(f"search {plan['name']}: no trial finished (all pruned or failed); see "
                                f"{out / 'search'}/trial*/sweep.log")
        elif args.status:
            print(study_status(plan, out.resolve()), flush=True)
        plan = seeded_plan(plan, out.resolve())
    runs = expand(plan, out)
    if args.status:
        print_status(runs, out)
        return 0
    print(f"sweep {plan['name']}: {len(runs)} runs in {out}", flush=True)
    check_unchanged(plan, runs)  # before any prepare step spends time
    failed = []
    if not args.report:
        prepare(plan, out, repo=REPO, dry_run=args.dry_run)
        # seed-major order: a sweep stopped half-way has every variant on its first seeds
        order = sorted(runs, key=lambda r: (plan["seeds"].index(r.seed), -1 if r.fold is None else r.fold))
        if executor["name"] == "slurm":
            from fgclf.sweep_slurm import execute_slurm

            failed = execute_slurm(plan, order, out_dir=out.resolve(), repo=REPO, options=executor,
                                   dry_run=args.dry_run)
        else:
            failed = execute(plan, order, repo=REPO, dry_run=args.dry_run, parallel=len(slots) if slots else 1,
                             slots=slots)
    if args.dry_run:
        return 0
    from fgclf.compare import compare_groups, format_markdown, write_comparison

    groups: dict[str, list[str]] = {}
    for run in runs:
        if status(run) == "done":
            groups.setdefault(run.variant, []).append(str(run.run_dir))
    if groups:
        result = compare_groups(groups, args.metrics)
        write_comparison(result, out / "comparison")
        print(format_markdown(result))
        print(f"comparison written to {out / 'comparison'} (summary.md, summary.html, summary.csv, summary.json, "
              "costs.csv, comparison.png)")
    if failed:
        print(f"error: {len(failed)} of {len(runs)} runs failed: " + ", ".join(str(r.run_dir) for r in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
