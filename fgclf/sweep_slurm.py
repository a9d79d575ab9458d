"""The ``slurm`` executor of ``scripts/sweep.py``: one submitit job per run.

Each job runs the run's ``accelerate launch`` command (:func:`fgclf.sweep.run_command`, which adds
``--resume last`` whenever the run has a checkpoint). On several nodes (``nodes`` > 1, one task a
node) every task launches with accelerate's multi-node settings taken from the job environment:
``--num_machines``, ``--machine_rank`` (the task's rank), ``--main_process_ip`` (the first node)
and ``--main_process_port``. A job is a ``submitit.helpers.Checkpointable``: when SLURM times it
out or preempts it (SIGUSR2 to the job), :meth:`SweepJob.checkpoint` passes the signal on to the
training process (which finishes its update, writes ``last/`` and exits; accelerate's launcher is
started with the signal ignored so that it waits for it) before submitit requeues the job, and
the requeued job resumes from ``last``. Running the sweep again while its jobs are queued or
running waits for those jobs (their ids are kept) instead of submitting them twice. A job that
fails otherwise (a node lost, the process killed) is submitted again by the sweep, up to
``max_retries`` times, and resumes the same way. ``cluster: local`` runs the jobs as local
processes through submitit's local executor (for trying a plan, and for the tests).

A search plan (``search:``) is run by ``workers`` :class:`SearchWorker` jobs sharing the study
(fgclf/search.py): each runs trials one after another on its job's resources until the study has
its trials, then the sweep submits ``baseline`` and the best trial over the seeds as above. On
SLURM's warning a worker passes it on to its running trial, which writes ``last/`` and stops; the
trial is then found dead (its worker's process is gone, or its heartbeat stale) and replaced by
a new one, and the requeued worker goes on searching.

Job ids are kept in ``<out>/.submitit/jobs.json``; ``sweep.py --status`` reads them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import submitit

from fgclf.errors import message_line
from fgclf.sweep import PlannedRun, jobs_file, run_command, status
from fgclf.utils import atomic_write_json

MAIN_PORT = 29500
WAIT_FOR_CHECKPOINT_S = 75  # within submitit's 90 s warning before the time limit


class SweepJob(submitit.helpers.Checkpointable):
    """One run as a submitit job (picklable: the plan, the run and the repository path)."""

    def __init__(self, plan: dict, run: PlannedRun, repo: Path, nodes: int = 1) -> None:
        self.plan, self.run, self.repo, self.nodes = plan, run, Path(repo), nodes
        self._proc = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._proc = None

    def command(self) -> list[str]:
        cmd = run_command(self.plan, self.run, self.repo)
        if self.nodes > 1:
            env = submitit.JobEnvironment()
            at = cmd.index("accelerate.commands.launch") + 1
            cmd[at:at] = ["--num_machines", str(self.nodes), "--machine_rank", str(env.global_rank),
                          "--main_process_ip", env.hostnames[0], "--main_process_port", str(MAIN_PORT)]
        return cmd

    def __call__(self) -> int:
        def usr2_ignored() -> None:  # the launcher ignores SLURM's warning; the training installs its own handler
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self._proc = subprocess.Popen(self.command(), cwd=self.repo, preexec_fn=usr2_ignored, start_new_session=True)
        try:
            code = self._proc.wait()
        finally:
            if self._proc.poll() is None:  # this job process is ending (an error): so does its run
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait()
        if code != 0:
            raise RuntimeError(f"{self.run.run_dir}: exit status {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SLURM's time-limit or preemption signal: the training process is told
        (SIGUSR2: it writes ``last/`` and stops), waited for, and the job requeued to resume."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGUSR2)
            try:
                proc.wait(timeout=WAIT_FOR_CHECKPOINT_S)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(SweepJob(self.plan, self.run, self.repo, self.nodes))


class SearchWorker(submitit.helpers.Checkpointable):
    """A job that runs trials of the plan's search until the study has its trials."""

    def __init__(self, plan: dict, out_dir: Path, repo: Path) -> None:
        self.plan, self.out_dir, self.repo = plan, Path(out_dir), Path(repo)

    def __call__(self) -> str:
        from fgclf.search import run_search

        run_search(self.plan, self.out_dir, repo=self.repo, wait=False)
        return "searched"

    def checkpoint(self, *args, **kwargs):
        """SLURM's warning: the running trial is told (SIGUSR2: it writes ``last/`` and stops) and
        waited for; the requeued worker searches on."""
        from fgclf.search import stop_live_trials

        stop_live_trials(signal.SIGUSR2, WAIT_FOR_CHECKPOINT_S)
        return submitit.helpers.DelayedSubmission(SearchWorker(self.plan, self.out_dir, self.repo))


def execute_search_slurm(plan: dict, *, out_dir: Path, repo: Path, options: dict,
                         poll_s: Optional[float] = None) -> None:
    """Submit the search's ``workers`` jobs (or wait for those still queued or running from an
    earlier call), resubmit a failed one while the study lacks trials (``max_retries``), and wait
    until every trial has ended."""
    import optuna
    from optuna.trial import TrialState

    from fgclf.search import open_study, wait_for_workers

    if poll_s is None:
        poll_s = 1.0 if options.get("cluster") in ("local", "debug") else 15.0
    search = plan["search"]
    study = open_study(plan, out_dir)  # created here, before the workers race to create it
    total = int(search.get("trials", 20))
    retries = int(options.get("max_retries", 2))
    executor = make_executor(out_dir, options, f"{plan['name']}-search")
    record_path = jobs_file(out_dir)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    jobs_record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    active: dict = {}

    def lacking() -> int:
        return total - len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def submit(key: str, attempt: int) -> None:
        job = executor.submit(SearchWorker(plan, out_dir, repo))
        active[key] = (job, attempt)
        jobs_record[key] = {"job_id": str(job.job_id), "attempt": attempt}
        atomic_write_json(record_path, jobs_record)
        print(f"{key}: submitted job {job.job_id} (attempt {attempt})", flush=True)

    for k in range(int(search.get("workers", 1))):
        key = f"search/worker{k}"
        earlier = jobs_record.get(key)
        if earlier:
            job = executor.job_class(folder=out_dir / ".submitit" / str(earlier["job_id"]), job_id=str(earlier["job_id"]))
            if not job.done():
                active[key] = (job, int(earlier["attempt"]))
                print(f"{key}: job {earlier['job_id']} is still queued or running; waiting for it", flush=True)
                continue
        if lacking() > 0:
            submit(key, 1)
    while active:
        time.sleep(poll_s)
        for key, (job, attempt) in list(active.items()):
            if not job.done():
                continue
            del active[key]
            error = job.exception()
            if error is None or lacking() <= 0:
                print(f"{key}: finished (job {job.job_id})", flush=True)
            elif attempt <= retries:
                why = message_line(error, last=True)
                print(f"{key}: job {job.job_id} failed ({why}); submitting again", file=sys.stderr, flush=True)
                submit(key, attempt + 1)
            else:
                print(f"{key}: FAILED after {attempt} attempts (job {job.job_id}; its log: "
                      f"{out_dir / '.submitit' / str(job.job_id)})", file=sys.stderr, flush=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    wait_for_workers(study, poll_s=poll_s)  # a worker that died mid-trial: its trial is found dead
    if lacking() > 0:
        print(f"search: the workers ended with {lacking()} of {total} trials missing (failed trials count against "
              f"each worker's budget; see {out_dir / 'search'}/trial*/sweep.log); run the sweep again to add them",
              file=sys.stderr, flush=True)


def executor_parameters(options: dict) -> dict:
    """submitit's ``update_parameters`` from the plan's executor section."""
    params = {"timeout_min": int(options.get("time_min", 60)), "nodes": int(options.get("nodes", 1)),
              "tasks_per_node": 1}
    for ours, theirs in (("gpus_per_node", "gpus_per_node"), ("cpus_per_task", "cpus_per_task"),
                         ("mem_gb", "mem_gb"), ("partition", "slurm_partition"), ("account", "slurm_account"),
                         ("setup", "slurm_setup")):
        if options.get(ours) is not None:
            params[theirs] = options[ours]
    return params


def make_executor(out_dir: Path, options: dict, name: str):
    executor = submitit.AutoExecutor(folder=str(out_dir / ".submitit" / "%j"), cluster=options.get("cluster"))
    executor.update_parameters(name=name, **executor_parameters(options))
    return executor


def execute_slurm(plan: dict, runs: list[PlannedRun], *, out_dir: Path, repo: Path, options: dict,
                  dry_run: bool = False, poll_s: Optional[float] = None) -> list[PlannedRun]:
    """Submit every unfinished run, wait for them, resubmit failed ones (``max_retries``); returns
    the runs that still failed."""
    from fgclf.sweep import begin_run, check_unchanged

    check_unchanged(plan, runs)
    if poll_s is None:  # the scheduler is asked less often than local processes
        poll_s = 1.0 if options.get("cluster") in ("local", "debug") else 15.0
    retries = int(options.get("max_retries", 2))
    nodes = int(options.get("nodes", 1))
    executor = None if dry_run else make_executor(out_dir, options, plan["name"])
    record_path = jobs_file(out_dir)
    jobs_record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    active: dict = {}  # run dir -> (job, run, attempt)

    def submit(run: PlannedRun, attempt: int) -> None:
        job = executor.submit(SweepJob(plan, run, repo, nodes))
        active[str(run.run_dir)] = (job, run, attempt)
        jobs_record[str(run.run_dir)] = {"job_id": str(job.job_id), "attempt": attempt}
        atomic_write_json(record_path, jobs_record)
        print(f"{run.variant} seed={run.seed}: submitted job {job.job_id} (attempt {attempt})", flush=True)

    for run in runs:
        state = status(run)
        label = f"{run.variant} seed={run.seed}" + (f" fold={run.fold}" if run.fold is not None else "")
        if state == "done":
            print(f"{label}: done, skipped", flush=True)
            continue
        earlier = jobs_record.get(str(run.run_dir))
        if earlier and not dry_run:
            job = executor.job_class(folder=out_dir / ".submitit" / str(earlier["job_id"]), job_id=str(earlier["job_id"]))
            if not job.done():  # submitted by an earlier sweep.py and still queued or running: wait for it
                active[str(run.run_dir)] = (job, run, int(earlier["attempt"]))
                print(f"{label}: job {earlier['job_id']} is still queued or running; waiting for it", flush=True)
                continue
        print(f"{label}: {'resuming' if state == 'partial' else 'running'}: "
              f"{' '.join(run_command(plan, run, repo))}", flush=True)
        if dry_run:
            continue
        begin_run(plan, run, state)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        submit(run, 1)
    failed = []
    while active:
        time.sleep(poll_s)
        for key, (job, run, attempt) in list(active.items()):
            if not job.done():
                continue
            del active[key]
            error = job.exception()
            if error is None and status(run) == "done":
                print(f"{run.variant} seed={run.seed}: finished (job {job.job_id})", flush=True)
            elif attempt <= retries:
                why = message_line(error, last=True) if error else "no metrics.json"
                print(f"{run.variant} seed={run.seed}: job {job.job_id} failed ({why}); submitting again, "
                      f"resuming from its last checkpoint", file=sys.stderr, flush=True)
                submit(run, attempt + 1)
            else:
                print(f"{run.variant} seed={run.seed}: FAILED after {attempt} attempts (job {job.job_id}; its log: "
                      f"{out_dir / '.submitit' / str(job.job_id)})", file=sys.stderr, flush=True)
                failed.append(run)
    return failed


__all__ = ["SearchWorker", "SweepJob", "execute_search_slurm", "execute_slurm", "executor_parameters",
           "make_executor"]
