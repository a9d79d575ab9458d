"""Sweeps: a YAML plan of variants x seeds (x folds) expanded into training runs.

A plan file::

    name: toy_tricks                       # summary folder name (runs/<name>/ by default)
    base: configs/toy_effnetlite0_finetune.yaml
    launch: [--config_file, accelerate_configs/cpu.yaml]   # accelerate launch arguments
    seeds: [1, 2, 3]
    folds: 0                               # k > 0: every seed runs all k folds
    set: {train.epochs: 6}                 # overrides for every run (not those of another script)
    variants:                              # one factor at a time; the first is the baseline
      ce: {}
      focal: {loss.name: focal}
      probe:                               # a variant may run another script, base config or launch
        script: scripts/train_probe.py
        base: null
        features: "{out}/features"        # "{out}" is the sweep's output folder
    grid:                                  # or/and: the product of these lists
      optim.name: [sgd, adamw]
    prepare:                               # steps run once, in order, before the runs (a step's
                                         # `launch` replaces the plan's; `launch: []` runs it plain)
      features:
        script: scripts/extract_features.py
        args: {output_dir: "{out}/features", overwrite: true}

Each run is ``<out>/<variant>/seed<S>[_fold<F>]``; a finished run (``metrics.json``) is
skipped, an interrupted one (``checkpoints/last``) is resumed. A prepare step that finished
(``<out>/.prepare/<name>.json``, written after it exits with 0) with the same command is skipped.
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from fgclf.checkpoint_paths import find_last
from fgclf.errors import UserError
from fgclf.utils import atomic_write_json

_PLAN_KEYS = {"name", "base", "launch", "seeds", "folds", "set", "variants", "grid", "script", "prepare", "executor",
              "search"}
_EXECUTOR_KEYS = {"local": {"name"}, "parallel": {"name", "parallel", "gpus_per_run"},
                  "slurm": {"name", "cluster", "partition", "account", "time_min", "nodes", "gpus_per_node",
                            "cpus_per_task", "mem_gb", "max_retries", "setup"}}
# keys of a variant that choose how it runs rather than a flag of the script
_RUN_KEYS = ("script", "base", "launch")
_PREPARE_KEYS = {"script", "launch", "args"}


@dataclass
class PlannedRun:
    """One training run of a sweep."""

    variant: str
    seed: int
    fold: Optional[int]
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # script/base/launch chosen by the variant

    def flags(self) -> list[str]:
        """CLI flags for the script (dotted keys; non-strings as JSON)."""
        return _flags(self.overrides)


def _flags(mapping: dict[str, Any]) -> list[str]:
    out = []
    for key, value in mapping.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


def _fill(value: Any, out_dir: Path) -> Any:
    """Replace ``{out}`` in string values with the sweep's output folder."""
    return value.replace("{out}", str(out_dir)) if isinstance(value, str) else value


def load_plan(path: str | Path) -> dict:
    """Read and check a sweep plan (unknown keys, missing base, empty seeds are errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep plan not found: {path}")
    try:
        plan = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"sweep plan {path} is not valid YAML: {err}") from None
    unknown = set(plan) - _PLAN_KEYS
    if unknown:
        raise UserError(f"unknown key(s) in sweep plan {path}: {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_PLAN_KEYS))}")
    if plan.get("base"):
        plan["base"] = _resolve_base(path, plan["base"])
    for name, variant in (plan.get("variants") or {}).items():
        if isinstance(variant, dict) and variant.get("base"):
            variant["base"] = _resolve_base(path, variant["base"])
    for name, step in (plan.get("prepare") or {}).items():
        if not isinstance(step, dict) or "script" not in step or set(step) - _PREPARE_KEYS:
            raise UserError(f"sweep plan {path}: prepare step '{name}' needs 'script' and may have "
                            f"{', '.join(sorted(_PREPARE_KEYS - {'script'}))} only")
    plan.setdefault("name", path.stem)
    plan.setdefault("seeds", [0])
    if not plan["seeds"]:
        raise UserError(f"sweep plan {path}: seeds must list at least one seed")
    if "search" in plan:
        from fgclf.search import check_search

        check_search(plan, str(path))
    return plan


def _resolve_base(plan_path: Path, base: str) -> str:
    """A config path relative to the current folder, else to the plan's folder or its parent."""
    found = next((c for c in (Path(base), plan_path.parent / base, plan_path.parent.parent / base) if c.is_file()),
                 None)
    if found is None:
        raise UserError(f"sweep plan {plan_path}: base config not found: {base}")
    return str(found.resolve())  # runs start in the repository, not here


def _variants(plan: dict) -> dict[str, dict]:
    """Named override sets: ``variants`` first (in file order), then the ``grid`` product."""
    variants = {str(k): dict(v or {}) for k, v in (plan.get("variants") or {}).items()}
    grid = plan.get("grid") or {}
    if grid:
        keys = list(grid)
        for values in itertools.product(*(grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys)):
            name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in zip(keys, values))
            variants[name] = dict(zip(keys, values))
    return variants or {"base": {}}


def expand(plan: dict, out_dir: str | Path) -> list[PlannedRun]:
    """Every run of the plan, in order: variant, then seed, then fold (absolute run folders)."""
    out_dir = Path(out_dir).resolve()
    folds = int(plan.get("folds") or 0)
    runs = []
    for name, overrides in _variants(plan).items():
        for seed in plan["seeds"]:
            for fold in (range(folds) if folds else [None]):
                settings = {k: _fill(overrides[k], out_dir) for k in _RUN_KEYS if k in overrides}
                flags = {k: v for k, v in overrides.items() if k not in _RUN_KEYS}
                extra = {**(plan.get("set") or {}), **flags, "train.seed": int(seed)}
                if "script" in settings:  # another script: the plan's `set` (its flags) may not apply
                    extra = {**flags, "train.seed": int(seed)}
                extra = {k: _fill(v, out_dir) for k, v in extra.items()}
                if fold is not None:
                    extra.update({"data.num_folds": folds, "data.fold": fold})
                sub = f"seed{seed}" + (f"_fold{fold}" if fold is not None else "")
                runs.append(PlannedRun(name, int(seed), fold, out_dir / name / sub, extra, settings))
    return runs


def _setting(plan: dict, run: PlannedRun, key: str, default: Any = None) -> Any:
    return run.settings[key] if key in run.settings else plan.get(key, default)


def run_command(plan: dict, run: PlannedRun, repo: Path) -> list[str]:
    """``python -m accelerate.commands.launch <launch args> scripts/train_classifier.py ...``."""
    script = repo / _setting(plan, run, "script", "scripts/train_classifier.py")
    launch = _setting(plan, run, "launch") or []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *map(str, launch), str(script)]
    base = _setting(plan, run, "base")
    if base:
        cmd += ["--config", str(base)]
    cmd += [*run.flags(), "--train.output_dir", str(run.run_dir), "--train.progress", "false"]
    if find_last(run.run_dir) is not None:
        cmd += ["--resume", "last"]
    return cmd


PLAN_FILE = "sweep_run.json"


def status(run: PlannedRun) -> str:
    """``done`` (metrics.json), ``partial`` (a resumable checkpoint) or ``todo``."""
    if (run.run_dir / "metrics.json").is_file():
        return "done"
    if find_last(run.run_dir) is not None:
        return "partial"
    return "todo"


def check_unchanged(plan: dict, runs: list[PlannedRun]) -> None:
    """Refuse to reuse a finished or partial run that was started with other settings.

    Each run folder records the base config and overrides it was launched with; a plan edited
    since then would otherwise mix old and new settings in one comparison.
    """
    for run in runs:
        record = run.run_dir / PLAN_FILE
        if status(run) == "todo" or not record.is_file():
            continue
        before = json.loads(record.read_text())
        now = _record(plan, run)
        if before != now:
            raise UserError(f"{run.run_dir} was run with other settings ({before['overrides']}); the plan now says "
                            f"{run.overrides}. Delete that folder or choose another --output-dir")


def begin_run(plan: dict, run: PlannedRun, state: str) -> None:
    """Ready a run's folder for its (re)start: a ``todo`` folder holds nothing to keep (a run that failed
    before its first checkpoint) and is emptied; the settings it is made with are recorded."""
    if state == "todo" and run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.run_dir / PLAN_FILE, _record(plan, run))


def _record(plan: dict, run: PlannedRun) -> dict:
    """What a run folder was made with (compared before it is reused)."""
    record = {"base": _setting(plan, run, "base"), "overrides": run.overrides}
    for key in ("script", "launch"):
        if key in run.settings:
            record[key] = run.settings[key]
    return record


def prepare(plan: dict, out_dir: str | Path, *, repo: Path, dry_run: bool = False) -> None:
    """Run the plan's ``prepare`` steps (skipping those already done with the same command)."""
    out_dir = Path(out_dir).resolve()
    for name, step in (plan.get("prepare") or {}).items():
        args = step.get("args") or {}
        args = _flags({k: _fill(v, out_dir) for k, v in args.items()}) if isinstance(args, dict) else \
            [str(_fill(a, out_dir)) for a in args]
        launch = step["launch"] if "launch" in step else (plan.get("launch") or [])  # launch: [] opts out
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *map(str, launch), str(repo / step["script"]), *args]
        marker = out_dir / ".prepare" / f"{name}.json"
        recorded = cmd[3:]  # without the interpreter path
        if marker.is_file():
            before = json.loads(marker.read_text())
            if before.get("command") == recorded:
                print(f"prepare {name}: done, skipped", flush=True)
                continue
            raise UserError(f"prepare step '{name}' ran before with another command ({' '.join(before['command'])}); "
                            f"delete {marker} to run it again")
        print(f"prepare {name}: running: {' '.join(cmd)}", flush=True)
        if dry_run:
            continue
        proc = subprocess.run(cmd, cwd=repo)
        if proc.returncode != 0:
            raise UserError(f"prepare step '{name}' failed with exit status {proc.returncode}; fix it, delete what it "
                            "left behind (its output folder) and run the sweep again")
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"command": recorded})


EXECUTORS = ("local", "parallel", "slurm")


def run_slots(parallel: int, gpus_per_run: int, gpu_count: int) -> list[dict]:
    """The environment of each of ``parallel`` concurrent runs: its own ``CUDA_VISIBLE_DEVICES``
    (``gpus_per_run`` GPUs each) when there are GPUs, else an equal share of the CPU cores as
    ``OMP_NUM_THREADS`` (which ``accelerate launch`` takes as its threads per process)."""
    import os

    if parallel < 1 or gpus_per_run < 1:
        raise UserError("--parallel and --gpus-per-run must be >= 1")
    if gpu_count:
        if parallel * gpus_per_run > gpu_count:
            raise UserError(f"--parallel {parallel} x --gpus-per-run {gpus_per_run} needs {parallel * gpus_per_run} "
                            f"GPUs; this node has {gpu_count}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # this process's GPUs, as the parent numbers them
        ids = visible.split(",")[:gpu_count] if visible else [str(g) for g in range(gpu_count)]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[k * gpus_per_run:(k + 1) * gpus_per_run])}
                for k in range(parallel)]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(parallel)]


def resolve_executor(plan: dict, *, name: Optional[str] = None, parallel: Optional[int] = None,
                     gpus_per_run: Optional[int] = None) -> dict:
    """The executor and its options: the command line's over the plan's ``executor:`` section
    (``{name: parallel, parallel: 4, gpus_per_run: 1}``); an option the executor does not have,
    or an unknown executor, is a UserError."""
    section = plan.get("executor") or {}
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        raise UserError("sweep plan: executor must be a name or a mapping such as {name: parallel, parallel: 4}")
    if name is not None and name != section.get("name", "local"):  # another executor: the plan's options are not its
        section = {}
    merged = {**section, **{k: v for k, v in (("name", name), ("parallel", parallel), ("gpus_per_run", gpus_per_run))
                            if v is not None}}
    merged.setdefault("name", "local")
    if merged["name"] not in _EXECUTOR_KEYS:
        raise UserError(f"unknown executor {merged['name']!r}; known: {', '.join(EXECUTORS)}")
    extra = set(merged) - _EXECUTOR_KEYS[merged["name"]]
    if extra:
        raise UserError(f"executor {merged['name']} has no option {', '.join(sorted(extra))} "
                        f"(it takes: {', '.join(sorted(_EXECUTOR_KEYS[merged['name']] - {'name'})) or 'none'})")
    if merged["name"] == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise UserError("executor slurm needs submitit: pip install submitit") from None
        for key in ("time_min", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "max_retries"):
            if key in merged and (not isinstance(merged[key], int) or merged[key] < 0):
                raise UserError(f"executor slurm: {key} must be a whole number >= 0, got {merged[key]!r}")
        if merged.get("cluster") not in (None, "slurm", "local", "debug"):
            raise UserError(f"executor slurm: cluster must be slurm, local or debug, got {merged['cluster']!r}")
    if merged["name"] == "parallel":
        merged.setdefault("parallel", 2)
        merged.setdefault("gpus_per_run", 1)
        if not isinstance(merged["parallel"], int) or not isinstance(merged["gpus_per_run"], int):
            raise UserError("executor parallel: parallel and gpus_per_run must be whole numbers")
    return merged


def jobs_file(out_dir: str | Path) -> Path:
    """Where the slurm executor keeps each run's last job id."""
    return Path(out_dir) / ".submitit" / "jobs.json"


def print_status(runs: list[PlannedRun], out_dir: str | Path) -> None:
    """Each run's state from its folder (``done``; ``partial``: a checkpoint to resume; ``todo``) and,
    for the slurm executor, its last job and attempt."""
    path = jobs_file(out_dir)
    jobs = json.loads(path.read_text()) if path.is_file() else {}
    print("| run | state | job | attempt |\n|---|---|---|---:|")
    for run in runs:
        job = jobs.get(str(run.run_dir), {})
        name = run.run_dir.relative_to(Path(out_dir)) if run.run_dir.is_relative_to(Path(out_dir)) else run.run_dir
        print(f"| {name} | {status(run)} | {job.get('job_id', '')} | {job.get('attempt', '')} |")


def execute(plan: dict, runs: list[PlannedRun], *, repo: Path, dry_run: bool = False, parallel: int = 1,
            slots: Optional[list[dict]] = None) -> list[PlannedRun]:
    """Run what is not finished; returns the runs that failed.

    One after another (``parallel`` 1: the ``local`` executor, output on this terminal), or
    ``parallel`` at a time, each with its slot's environment (:func:`run_slots`) and its output in
    ``<run>/sweep.log``, started in the given order as slots free up; a failed run is reported and
    the others go on. A run folder left without any checkpoint (a run that failed before its first
    epoch ended) holds nothing to keep and is started again from scratch.
    """
    import os
    import time

    check_unchanged(plan, runs)
    failed: list[PlannedRun] = []
    slots = slots or [{}] * parallel
    free = list(range(len(slots)))
    active: dict = {}  # Popen -> (run, label, slot, log file)

    def reap(block: bool) -> None:
        while active:
            for proc in list(active):
                if proc.poll() is None:
                    continue
                run, label, slot, log = active.pop(proc)
                log.close()
                free.append(slot)
                if proc.returncode != 0:
                    print(f"{label}: FAILED with exit status {proc.returncode} (log: {run.run_dir / 'sweep.log'})",
                          file=sys.stderr, flush=True)
                    failed.append(run)
                else:
                    print(f"{label}: finished", flush=True)
                if not block:
                    return
            if not block or not active:
                return
            time.sleep(0.5)

    for k, run in enumerate(runs, 1):
        state = status(run)
        label = f"[{k}/{len(runs)}] {run.variant} seed={run.seed}" + (f" fold={run.fold}" if run.fold is not None else "")
        if state == "done":
            print(f"{label}: done, skipped", flush=True)
            continue
        cmd = run_command(plan, run, repo)
        print(f"{label}: {'resuming' if state == 'partial' else 'running'}: {' '.join(cmd)}", flush=True)
        if dry_run:
            continue
        begin_run(plan, run, state)
        if parallel == 1:
            proc = subprocess.run(cmd, cwd=repo, env={**os.environ, **slots[0]})
            if proc.returncode != 0:
                print(f"{label}: FAILED with exit status {proc.returncode}", file=sys.stderr, flush=True)
                failed.append(run)
            continue
        while not free:
            reap(block=False)
            if not free:
                time.sleep(0.5)
        slot = free.pop(0)
        log = open(run.run_dir / "sweep.log", "a")
        proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **slots[slot]}, stdout=log, stderr=subprocess.STDOUT)
        active[proc] = (run, label, slot, log)
    reap(block=True)
    return failed
