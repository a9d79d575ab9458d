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
      workers: 4                               # executor slurm: jobs searching at once (default 1)
      storage: postgresql://user@db/fgclf      # optional: another study store (default: SQLite below)

Each trial is a run of the plan (its ``base``, ``set`` and ``launch``, the plan's first seed) in
``<out>/search/trial<N>``. While it trains, the sweep reads its ``metrics.jsonl`` and reports each
epoch's validation value to the trial; when the pruner says so the run is stopped (SIGTERM: it
writes ``last/`` and exits) and the trial is recorded as pruned. A trial's value is the validation
value of the weights the run keeps as ``best`` (its early-stopping metric is set to the search's).
The study lives in ``<out>/search/study.db`` (SQLite; ``storage:`` names another, e.g. a
PostgreSQL URL when workers on several nodes share a file system that does not lock SQLite files)
with a fingerprint of the plan: a stopped search continues where it was, and a plan whose space,
settings, base or metric changed is refused. Several workers share one study: ``--executor
parallel`` runs several trials at once inside one sweep, ``sweep.py --search-only`` adds a worker
(another shell or node), and the slurm executor submits ``workers`` jobs that search together.
Each trial records its worker (host and process id) and Optuna's heartbeat: a trial left running
by a worker that died is marked failed when its process is gone from this host, or when its
heartbeat is older than ``GRACE_S`` (any host), and its place is taken by a new trial. Afterwards the best trial's settings are written
as ``<out>/search/best.yaml`` (the base config with them applied: ``--config`` takes it), and the
sweep runs ``baseline`` (the plan as it is) and ``best`` over the plan's seeds and compares them:
a search result without seeds is not a result.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from fgclf.errors import UserError, error_line, message_line

_SEARCH_KEYS = {"space", "trials", "metric", "sampler", "pruner", "seed", "direction", "workers", "storage"}
HEARTBEAT_S = 15  # a running trial's heartbeat (Optuna's RDBStorage heartbeat_interval)
GRACE_S = 90  # a running trial whose heartbeat is older than this belongs to a dead worker
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
    if not isinstance(search.get("workers", 1), int) or search.get("workers", 1) < 1:
        raise UserError(f"sweep plan {path}: search workers must be a whole number >= 1")
    if "storage" in search and not (isinstance(search["storage"], str) and "://" in search["storage"]):
        raise UserError(f"sweep plan {path}: search storage must be a database URL such as "
                        "postgresql://user:password@host/db or sqlite:////shared/study.db")
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


def storage_url(plan: dict, out_dir: Path) -> str:
    """Where the plan's study lives: its ``storage`` URL, else ``<out>/search/study.db``."""
    return plan["search"].get("storage") or f"sqlite:///{Path(out_dir) / 'search' / 'study.db'}"


def _storage(url: str):
    import optuna

    # SQLite: writers wait for each other's lock instead of failing at once
    import warnings

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna (since 2.9)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S)


def _machine() -> str:
    """This host as the process-id rule must see it: the host name, plus the boot and the process-id
    namespace where Linux tells them (containers sharing a host name do not share process ids)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def worker_id() -> str:
    """``host[/boot/pid-namespace]:pid`` of this search process (recorded on each trial it runs)."""
    return f"{_machine()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_stale_trials(study) -> list[int]:
    """Mark failed the running trials whose worker is dead; returns their numbers.

    A trial's worker is dead when it ran on this host and its process is gone, or when the trial's
    heartbeat is older than ``GRACE_S`` (Optuna's stale-trial rule, for workers on other hosts). A
    trial asked for but not started by its worker yet (no worker recorded) counts as dead once it
    is ``GRACE_S`` old.
    """
    import datetime
    import warnings

    import optuna
    from optuna.trial import TrialState

    before = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = _machine()
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        where, _, pid = (worker or "").rpartition(":")
        dead = (where == host and not _alive(int(pid))) if worker else \
            (trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() > GRACE_S)
        if dead:
            try:
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
                pass
    still = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t._trial_id in before - still]
    for trial in failed:
        print(f"search: trial {trial.number} was left running by a stopped worker "
              f"({trial.user_attrs.get('worker', 'not started')}); marked failed", flush=True)
    return [t.number for t in failed]


def _create(name: str, url: str, direction: str, tries: int = 5):
    """The storage and the study, created if new; workers starting together race to create the
    database's tables and the study: the loser finds them made and tries again."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(tries):
        try:
            storage = _storage(url)
            return storage, optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                                direction=direction)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                optuna.exceptions.DuplicatedStudyError) as err:
            race = not isinstance(err, sqlalchemy.exc.OperationalError) or "locked" in str(err)
            if not race or attempt == tries - 1:
                raise UserError(f"search: cannot open the study at {url}: {message_line(err)}") from None
            time.sleep(0.5 + attempt)
        except (ImportError, ValueError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as err:
            raise UserError(f"search: cannot open the study at {url} ({error_line(err)}); is the URL right and its "
                            "database driver installed?") from None


def open_study(plan: dict, out_dir: Path):
    """The plan's study (created or continued); trials left running by workers that died are marked
    failed (:func:`fail_stale_trials`)."""
    import optuna

    search = plan["search"]
    folder = out_dir / "search"
    folder.mkdir(parents=True, exist_ok=True)
    _, direction = _watched(search)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, study = _create(plan["name"], storage_url(plan, out_dir), direction)
    fingerprint = json.dumps({"space": search["space"], "set": plan.get("set"), "base": plan.get("base"),
                              "metric": search.get("metric", "top1"), "direction": direction,
                              "seed": plan["seeds"][0]}, sort_keys=True, default=str)
    stored = study.user_attrs.get("plan")
    if stored is None:
        study.set_user_attr("plan", fingerprint)
    elif stored != fingerprint:
        raise UserError(f"{storage_url(plan, out_dir)} holds a search with another space, settings, base, metric or "
                        "seed; choose another --output-dir (or storage) or delete it")
    study = optuna.load_study(study_name=plan["name"], storage=storage,
                              sampler=_sampler(search, offset=len(study.trials)), pruner=_pruner(search))
    fail_stale_trials(study)
    return study


def wait_for_workers(study, poll_s: float = 5.0) -> None:
    """Wait until no trial of the study is running (other workers' trials finish or are found dead)."""
    from optuna.trial import TrialState

    said = None
    while True:
        fail_stale_trials(study)
        running = sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if not running:
            return
        if running != said:
            print(f"search: waiting for trial(s) {', '.join(map(str, running))} of other workers", flush=True)
            said = running
        time.sleep(poll_s)


# the trials this process is running: {pid: Popen} (a SLURM worker's checkpoint stops them)
LIVE: dict = {}


def stop_live_trials(sig: int = signal.SIGTERM, timeout_s: float = 75.0) -> None:
    """Send ``sig`` to every running trial's process group and wait (up to ``timeout_s`` in all) for
    them to write ``last/`` and exit."""
    deadline = time.monotonic() + timeout_s
    for proc in list(LIVE.values()):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
    for proc in list(LIVE.values()):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def run_search(plan: dict, out_dir: Path, *, repo: Path, poll_s: float = 1.0,
               slots: Optional[list[dict]] = None, wait: bool = True) -> Optional[dict]:
    """Run the trials the study still lacks; returns the best trial's settings (None if none finished).

    ``slots`` (the parallel executor's, :func:`fgclf.sweep.run_slots`): that many trials at once,
    each with its slot's environment (its GPUs). The study stops at ``trials`` finished or pruned
    trials counted over every worker sharing it (a worker may finish the trial it is running
    after that, so a study with several workers can end with a few more). ``wait``: before
    choosing the best, wait for other workers' running trials (:func:`wait_for_workers`).
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
        trial.set_user_attr("worker", worker_id())
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
            # SLURM's time-limit warning is the worker's to pass on (stop_live_trials), not the launcher's
            # (a shell sets it: preexec_fn is unsafe while the heartbeat and trial threads run)
            proc = subprocess.Popen(["sh", "-c", 'trap "" USR2; exec "$@"', "sh", *cmd], cwd=repo, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **slot})
            LIVE[proc.pid] = proc
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
                LIVE.pop(proc.pid, None)
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
    if wait:
        wait_for_workers(study, poll_s=max(poll_s, 1.0))
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

    url = storage_url(plan, out_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=plan["name"], storage=url)
    except KeyError:  # no study of that name there yet
        return None
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


def study_status(plan: dict, out_dir: Path) -> str:
    """One line: the study's trials by state, against the plan's total."""
    import collections

    import optuna

    url = storage_url(plan, out_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return "search: no study yet"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trials = optuna.load_study(study_name=plan["name"], storage=url).get_trials(deepcopy=False)
    except KeyError:
        return "search: no study yet"
    counts = collections.Counter(t.state.name.lower() for t in trials)
    return (f"search: {counts['complete'] + counts['pruned']} of {plan['search'].get('trials', 20)} trials done ("
            + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ")")


__all__ = ["GRACE_S", "HEARTBEAT_S", "LIVE", "best_trial", "check_search", "fail_stale_trials", "open_study",
           "run_search", "seeded_plan", "stop_live_trials", "storage_url", "study_status", "suggest", "trial_value",
           "wait_for_workers", "worker_id", "write_best_config"]
