"""Sweeps: a YAML plan of variants x seeds (x folds) expanded into training runs.

A plan file::

    name: toy_tricks                       # summary folder name (runs/<name>/ by default)
    base: configs/toy_effnetlite0_finetune.yaml
    launch: [--config_file, accelerate_configs/cpu.yaml]   # accelerate launch arguments
    seeds: [1, 2, 3]
    folds: 0                               # k > 0: every seed runs all k folds
    set: {train.epochs: 6}                 # overrides for every run
    variants:                              # one factor at a time; the first is the baseline
      ce: {}
      focal: {loss.name: focal}
    grid:                                  # or/and: the product of these lists
      optim.name: [sgd, adamw]

Each run is ``<out>/<variant>/seed<S>[_fold<F>]``; a finished run (``metrics.json``) is
skipped, an interrupted one (``checkpoints/last``) is resumed.
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

_PLAN_KEYS = {"name", "base", "launch", "seeds", "folds", "set", "variants", "grid", "script"}


@dataclass
class PlannedRun:
    """One training run of a sweep."""

    variant: str
    seed: int
    fold: Optional[int]
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> list[str]:
        """CLI flags for train_classifier.py (dotted keys; non-strings as JSON)."""
        out = []
        for key, value in self.overrides.items():
            out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return out


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
    if "base" in plan:  # relative to the current folder, else to the plan's folder or its parent
        found = next((c for c in (Path(plan["base"]), path.parent / plan["base"], path.parent.parent / plan["base"])
                      if c.is_file()), None)
        if found is None:
            raise UserError(f"sweep plan {path}: base config not found: {plan['base']}")
        plan["base"] = str(found.resolve())  # runs start in the repository, not here
    plan.setdefault("name", path.stem)
    plan.setdefault("seeds", [0])
    if not plan["seeds"]:
        raise UserError(f"sweep plan {path}: seeds must list at least one seed")
    return plan


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
                extra = {**(plan.get("set") or {}), **overrides, "train.seed": int(seed)}
                if fold is not None:
                    extra.update({"data.num_folds": folds, "data.fold": fold})
                sub = f"seed{seed}" + (f"_fold{fold}" if fold is not None else "")
                runs.append(PlannedRun(name, int(seed), fold, out_dir / name / sub, extra))
    return runs


def run_command(plan: dict, run: PlannedRun, repo: Path) -> list[str]:
    """``python -m accelerate.commands.launch <launch args> scripts/train_classifier.py ...``."""
    script = repo / plan.get("script", "scripts/train_classifier.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *map(str, plan.get("launch") or []), str(script)]
    if plan.get("base"):
        cmd += ["--config", str(plan["base"])]
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
        now = {"base": plan.get("base"), "overrides": run.overrides}
        if before != now:
            raise UserError(f"{run.run_dir} was run with other settings ({before['overrides']}); the plan now says "
                            f"{run.overrides}. Delete that folder or choose another --output-dir")


def execute(plan: dict, runs: list[PlannedRun], *, repo: Path, dry_run: bool = False) -> list[PlannedRun]:
    """Run what is not finished, one after another; returns the runs that failed.

    A run folder left without any checkpoint (a run that failed before its first epoch
    ended) holds nothing to keep and is started again from scratch.
    """
    check_unchanged(plan, runs)
    failed = []
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
        if state == "todo" and run.run_dir.exists():
            shutil.rmtree(run.run_dir)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.run_dir / PLAN_FILE, {"base": plan.get("base"), "overrides": run.overrides})
        proc = subprocess.run(cmd, cwd=repo)
        if proc.returncode != 0:
            print(f"{label}: FAILED with exit status {proc.returncode}", file=sys.stderr, flush=True)
            failed.append(run)
    return failed
