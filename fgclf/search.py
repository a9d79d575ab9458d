"""Hyperparameter search over a sweep plan with Optuna (the plan's ``search:`` section).

    search:
      space:                                   # any config key of the plan's script
        optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        loss.name: {type: categorical, choices: [ce, focal]}
        model.drop_rate: {type: float, low: 0.0, high: 0.5}
        train.epochs: {type: int, low: 4, high: 12}
      trials: 30                               # in all, over every restart and worker
      metric: top1                             # the validation metric (val/<metric>, per epoch)
      sampler: tpe                             # tpe, random, cmaes, qmc, gp (optuna.samplers.<Name>Sampler)
      pruner: median                           # median, hyperband, none, or {name: threshold, lower: 0.2}
      seed: 0                                  # the sampler's seed

Each trial is a run of the plan (its ``base``, ``set`` and ``launch``, the plan's first seed) in
``<out>/search/trial<N>``. While it trains, the sweep reads its ``metrics.jsonl`` and reports each
epoch's validation value to the trial; when the pruner says so the run is stopped (SIGTERM: it
writes ``last/`` and exits) and the trial is recorded as pruned. A trial's value is the validation
value of the weights the run keeps as ``best`` (its early-stopping metric is set to the search's).
The study lives in ``<out>/search/study.db`` (SQLite) with a fingerprint of the plan: a stopped
search continues where it was (a trial left running by a killed search is marked failed: one
search process per study; ``--executor parallel`` runs several trials at once inside it), and a
plan whose space, settings, base or metric changed is refused. Afterwards the best trial's settings are written
as ``<out>/search/best.yaml`` (the base config with them applied: ``--config`` takes it), and the
sweep runs ``baseline`` (the plan as it is) and ``best`` over the plan's seeds and compares them:
a search result without seeds is not a result.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from fgclf.errors import UserError

_SEARCH_KEYS = {"space", "trials", "metric", "sampler", "pruner", "seed", "direction"}
_SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "qmc": "QMCSampler",
             "gp": "GPSampler"}


def _config_has(key: str) -> bool:
    """Whether the dotted ``key`` names a field of train_classifier's config."""
    from fgclf.config import TrainClassifierConfig

    cls: Any = TrainClassifierConfig
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        cls = cls() if callable(cls) else cls
        cls = type(cls) if cls is not None and dataclasses.is_dataclass(cls) else None
    return True


def check_search(plan: dict, path: str = "plan") -> dict:
    """The plan's ``search`` section, checked (one-line UserErrors before anything starts)."""
    search = plan.get("search")
    if not isinstance(search, dict) or not isinstance(search.get("space"), dict) or not search["space"]:
        raise UserError(f"sweep plan {path}: search needs a space (config key -> {{type, low, high}} or choices)")
    unknown = set(search) - _SEARCH_KEYS
    if unknown:
        raise UserError(f"sweep plan {path}: unknown search key(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_SEARCH_KEYS))}")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("search needs optuna: pip install 'fgclf[search]'") from None
    for key, spec in search["space"].items():
        if not _config_has(key):
            raise UserError(f"sweep plan {path}: search space key {key!r} is not a setting of train_classifier.py")
        kind = spec.get("type") if isinstance(spec, dict) else None
        ok = (kind in ("float", "int") and {"low", "high"} <= set(spec) and spec["low"] < spec["high"]) or (
            kind == "categorical" and isinstance(spec.get("choices"), list) and spec["choices"])
        if not ok:
            raise UserError(f"sweep plan {path}: search space {key}: give {{type: float|int, low, high[, log, step]}} "
                            "with low < high, or {type: categorical, choices: [...]}")
        if kind == "float" and spec.get("log") and (float(spec["low"]) <= 0 or spec.get("step") is not None):
            raise UserError(f"sweep plan {path}: search space {key}: log needs low > 0 and no step")
    from fgclf.metrics import list_metrics

    metric = str(search.get("metric", "top1"))
    if metric != "loss" and metric not in list_metrics():
        raise UserError(f"sweep plan {path}: search metric {metric!r} is not a validation metric; use loss or one of "
                        f"{', '.join(list_metrics())}")
    if search.get("direction") not in (None, "maximize", "minimize"):
        raise UserError(f"sweep plan {path}: search direction must be maximize or minimize")
    if not isinstance(search.get("seed", 0), int):
        raise UserError(f"sweep plan {path}: search seed must be a whole number")
    if not isinstance(search.get("trials", 20), int) or search.get("trials", 20) < 1:
        raise UserError(f"sweep plan {path}: search trials must be a whole number >= 1")
    if str(search.get("sampler", "tpe")) not in _SAMPLERS:
        raise UserError(f"sweep plan {path}: unknown sampler {search['sampler']!r}; known: {', '.join(_SAMPLERS)}")
    pruner = search.get("pruner", "median")
    name = pruner.get("name") if isinstance(pruner, dict) else pruner
    if name not in ("median", "hyperband", "none", "threshold"):
        raise UserError(f"sweep plan {path}: unknown pruner {name!r}; known: median, hyperband, threshold, none")
    try:
        _pruner(search)
    except (TypeError, ValueError) as err:
        raise UserError(f"sweep plan {path}: pruner {pruner}: {err}") from None
    if "variants" in plan or "grid" in plan:
        raise UserError(f"sweep plan {path}: a search plan has no variants or grid (it compares baseline and best)")
    return search


def _sampler(search: dict, offset: int = 0):
    """The sampler, seeded with ``seed`` plus the trials the study already has (a restarted search
    does not draw its first points again)."""
    import optuna

    return getattr(optuna.samplers, _SAMPLERS[str(search.get("sampler", "tpe"))])(seed=search.get("seed", 0) + offset)


def _pruner(search: dict):
    import optuna

    pruner = search.get("pruner", "median")
    options = dict(pruner) if isinstance(pruner, dict) else {"name": pruner}
    name = options.pop("name")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**options)
    return optuna.pruners.MedianPruner(**{"n_startup_trials": 2, **options})


def suggest(trial, space: dict) -> dict:
    """The trial's value of every key of the space."""
    out = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            out[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            out[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                         log=bool(spec.get("log", False)))
        else:
            out[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                           log=bool(spec.get("log", False)))
    return out


def _watched(search: dict) -> tuple[str, str]:
    metric = str(search.get("metric", "top1"))
    direction = search.get("direction") or ("minimize" if metric == "loss" else "maximize")
    return f"val/{metric}", direction


def open_study(plan: dict, out_dir: Path):
    """The plan's study in ``<out>/search/study.db`` (created or continued); trials a killed search
    left running are marked failed."""
    import optuna
    from optuna.trial import TrialState

    search = plan["search"]
    folder = out_dir / "search"
    folder.mkdir(parents=True, exist_ok=True)
    _, direction = _watched(search)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.create_study(study_name=plan["name"], storage=storage, load_if_exists=True, direction=direction)
    fingerprint = json.dumps({"space": search["space"], "set": plan.get("set"), "base": plan.get("base"),
                              "metric": search.get("metric", "top1"), "direction": direction,
                              "seed": plan["seeds"][0]}, sort_keys=True, default=str)
    stored = study.user_attrs.get("plan")
    if stored is None:
        study.set_user_attr("plan", fingerprint)
    elif stored != fingerprint:
        raise UserError(f"{folder / 'study.db'} belongs to a search with another space, settings, base, metric or seed; "
                        "choose another --output-dir or delete it")
    study = optuna.load_study(study_name=plan["name"], storage=storage,
                              sampler=_sampler(search, offset=len(study.trials)), pruner=_pruner(search))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(stale._trial_id, TrialState.FAIL)
        print(f"search: trial {stale.number} was left running by a stopped search; marked failed", flush=True)
    return study


def run_search(plan: dict, out_dir: Path, *, repo: Path, poll_s: float = 1.0,
               slots: Optional[list[dict]] = None) -> Optional[dict]:
    """Run the trials the study still lacks; returns the best trial's settings (None if none finished).

    ``slots`` (the parallel executor's, :func:`fgclf.sweep.run_slots`): that many trials at once,
    each with its slot's environment (its GPUs). The study stops at ``trials`` finished or pruned
    trials counted over every worker sharing it.
    """
    import queue

    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from fgclf.sweep import PlannedRun, _fill, run_command

    search = plan["search"]
    key, _ = _watched(search)
    study = open_study(plan, out_dir)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    seed = int(plan["seeds"][0])

    free: queue.Queue = queue.Queue()
    for slot in slots or [{}]:
        free.put(slot)

    def objective(trial) -> float:
        slot = free.get()
        try:
            return run_trial(trial, slot)
        finally:
            free.put(slot)

    def run_trial(trial, slot: dict) -> float:
        params = suggest(trial, search["space"])
        overrides = {**{k: _fill(v, out_dir) for k, v in (plan.get("set") or {}).items()}, **params,
                     "train.seed": seed, "train.early_stopping_metric": str(search.get("metric", "top1"))}
        run = PlannedRun("search", seed, None, out_dir / "search" / f"trial{trial.number}", overrides, {})
        if run.run_dir.exists():  # a trial number reused (a study started again): nothing of the old run counts
            import shutil

            shutil.rmtree(run.run_dir)
        cmd = run_command(plan, run, repo)
        print(f"search: trial {trial.number} {json.dumps(params)}", flush=True)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / "sweep.log", "a") as log:
            # its own process group: the stop reaches the training process behind accelerate's launcher
            proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **slot})
            reported, pruned = 0, False
            try:
                while True:
                    finished = proc.poll() is not None
                    rows = _rows(run.run_dir)
                    for row in rows[reported:]:
                        if key in row:
                            trial.report(float(row[key]), int(row["epoch"]))
                            if trial.should_prune() and not finished:
                                os.killpg(proc.pid, signal.SIGTERM)  # the run writes last/ and stops
                                pruned = True
                    reported = len(rows)
                    if finished or pruned:
                        break
                    time.sleep(poll_s)
            finally:  # Ctrl-C or an error here: the run (in its own process group) stops too
                if proc.poll() is None and not pruned:
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
        if pruned:
            print(f"search: trial {trial.number} pruned after epoch {reported}", flush=True)
            raise optuna.TrialPruned()
        if proc.returncode != 0:
            raise RuntimeError(f"trial {trial.number} failed with exit status {proc.returncode} "
                               f"(log: {run.run_dir / 'sweep.log'})")
        return trial_value(run.run_dir, key)

    total = int(search.get("trials", 20))
    if total - done > 0:
        study.optimize(objective, n_trials=total - done, catch=(RuntimeError,), n_jobs=len(slots or [{}]),
                       callbacks=[MaxTrialsCallback(total, states=(TrialState.COMPLETE, TrialState.PRUNED))])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    print(f"search: best trial {best.number}: {key} {best.value:.4f} with {json.dumps(best.params)}", flush=True)
    return dict(best.params)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return rows


def trial_value(run_dir: Path, key: str) -> float:
    """The validation value of the weights a finished run keeps as ``best`` (raw or averaged: the
    best checkpoint's ``best_metric``, its early-stopping metric being the search's)."""
    try:
        state = json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text())
        value = state["best_metric"]
        if value is None:
            raise KeyError(key)
        return float(value)
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"{run_dir}: no validation value {key} for its best weights ({err}); does the "
                           "dataset have a validation split?") from None


def best_trial(plan: dict, out_dir: Path):
    """The study's best complete trial, or None (read only)."""
    import optuna
    from optuna.trial import TrialState

    path = out_dir / "search" / "study.db"
    if not path.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=plan["name"], storage=f"sqlite:///{path}")
    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def seeded_plan(plan: dict, out_dir: Path) -> dict:
    """The plan that re-runs the search's result over the seeds: ``baseline`` (the plan as it is) and
    ``best_trial<N>`` (``<out>/search/best.yaml``); a later, better trial gets its own variant."""
    best = best_trial(plan, out_dir)
    variants: dict = {"baseline": {}}
    if best is not None:
        path = write_best_config(plan, dict(best.params), out_dir / "search" / "best.yaml", out_dir)
        # its settings as flags too: the plan's `set` comes after --config and would undo them
        variants[f"best_trial{best.number}"] = {"base": str(path), **best.params}
    return {**{k: v for k, v in plan.items() if k != "search"}, "variants": variants}


def write_best_config(plan: dict, params: dict, path: Path, out_dir: Optional[Path] = None) -> Path:
    """The plan's base config with its ``set`` and the best trial's settings applied (nested YAML)."""
    from fgclf.sweep import _fill
    from fgclf.utils import atomic_write_text

    config = yaml.safe_load(Path(plan["base"]).read_text()) if plan.get("base") else {}
    settings = {k: _fill(v, out_dir) if out_dir is not None else v for k, v in (plan.get("set") or {}).items()}
    for key, value in {**settings, **params}.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    atomic_write_text(path, "# the best trial of the search (fgclf/search.py); train with --config this file\n"
                      + yaml.safe_dump(config, sort_keys=False))
    return path


__all__ = ["best_trial", "check_search", "open_study", "run_search", "seeded_plan", "suggest", "trial_value",
           "write_best_config"]
