"""A tiny sweep (2 variants x 2 seeds, one epoch) end to end: its report equals the runs it summarises."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_ARGS, run_script
from scipy import stats

from fgclf.errors import UserError
from fgclf.sweep import expand, load_plan


def _plan(tmp_path: Path, toy_root: Path) -> Path:
    flags = dict(zip(TINY_ARGS[::2], TINY_ARGS[1::2]))
    settings = {k.lstrip("-"): v for k, v in flags.items()}
    settings.update({"data.format": "cub", "data.root": str(toy_root), "train.epochs": 1, "optim.lr": 0.01})
    plan = {"name": "tiny", "launch": ["--config_file", "accelerate_configs/cpu.yaml"], "seeds": [1, 2],
            "set": settings, "variants": {"ce": {}, "smooth": {"loss.name": "label_smoothing"}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow  # sweep.py runs in the default suite through tests/scripts/test_compare_runs.py (k-fold)
def test_tiny_sweep_report_matches_its_runs(toy_root, tmp_path):
    plan, out = _plan(tmp_path, toy_root), tmp_path / "sweep"
    proc = run_script("sweep.py", [str(plan), "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "comparison" / "summary.json").read_text())
    top1 = {v: [json.loads((out / v / f"seed{s}" / "metrics.json").read_text())["top1"] for s in (1, 2)]
            for v in ("ce", "smooth")}
    rows = {(r["group"], r["metric"]): r for r in summary["summaries"]}
    for variant, values in top1.items():
        assert rows[(variant, "top1")]["mean"] == pytest.approx(np.mean(values))
        assert rows[(variant, "top1")]["std"] == pytest.approx(np.std(values, ddof=1), nan_ok=True)
    diff = np.subtract(top1["smooth"], top1["ce"])
    comp = summary["comparisons"][0]["metrics"]["top1"]
    assert comp["ttest"]["mean_diff"] == pytest.approx(diff.mean())
    if np.ptp(diff) > 1e-9:  # equal differences (up to float rounding) are flagged zero variance, p = nan
        assert comp["ttest"]["p"] == pytest.approx(stats.ttest_rel(top1["smooth"], top1["ce"]).pvalue)
    assert (out / "comparison" / "comparison.png").exists() and (out / "comparison" / "summary.md").exists()
    again = run_script("sweep.py", [str(plan), "--output-dir", str(out)])  # finished runs are skipped
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4


def test_plan_expansion_and_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("seeds: [1, 2]\nfolds: 3\ngrid: {optim.name: [sgd, adam], loss.name: [ce]}\n")
    runs = expand(load_plan(path), tmp_path / "out")
    assert len(runs) == 2 * 2 * 3
    assert {r.variant for r in runs} == {"name-sgd_name-ce", "name-adam_name-ce"}
    assert runs[0].overrides["data.num_folds"] == 3 and {r.fold for r in runs} == {0, 1, 2}
    assert runs[0].run_dir == tmp_path / "out" / "name-sgd_name-ce" / "seed1_fold0"
    path.write_text("seedz: [1]\n")
    with pytest.raises(UserError, match="unknown key"):
        load_plan(path)


def test_edited_plan_does_not_reuse_runs_made_with_other_settings(tmp_path):
    import json as _json

    from fgclf.sweep import PLAN_FILE, check_unchanged

    path = tmp_path / "p.yaml"
    path.write_text("seeds: [1]\nset: {train.epochs: 6}\n")
    plan = load_plan(path)
    (run,) = expand(plan, tmp_path / "out")
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.json").write_text("{}")
    (run.run_dir / PLAN_FILE).write_text(_json.dumps({"base": None, "overrides": run.overrides}))
    check_unchanged(plan, [run])  # same settings: reused
    path.write_text("seeds: [1]\nset: {train.epochs: 4}\n")
    plan = load_plan(path)
    with pytest.raises(UserError, match="was run with other settings"):
        check_unchanged(plan, expand(plan, tmp_path / "out"))


def test_variant_may_choose_script_base_and_launch(tmp_path):
    from fgclf.sweep import run_command

    (tmp_path / "base.yaml").write_text("train: {epochs: 1}\n")
    (tmp_path / "other.yaml").write_text("train: {epochs: 2}\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "base": "base.yaml", "seeds": [3], "launch": ["--config_file", "a.yaml"], "set": {"train.epochs": 5},
        "variants": {"plain": {},
                     "other": {"base": "other.yaml", "optim.lr": 0.1},
                     "probe": {"script": "scripts/train_probe.py", "base": None, "features": "{out}/feats",
                               "launch": ["--num_processes", "1"]}}}))
    plan = load_plan(path)
    runs = {r.variant: r for r in expand(plan, tmp_path / "out")}
    out = (tmp_path / "out").resolve()
    repo = Path("/repo")
    plain = run_command(plan, runs["plain"], repo)
    assert plain[3:] == ["--config_file", "a.yaml", "/repo/scripts/train_classifier.py", "--config",
                         str((tmp_path / "base.yaml").resolve()), "--train.epochs", "5", "--train.seed", "3",
                         "--train.output_dir", str(out / "plain" / "seed3"), "--train.progress", "false"]
    other = run_command(plan, runs["other"], repo)  # another base, same script: the plan's `set` still applies
    assert other[other.index("--config") + 1] == str((tmp_path / "other.yaml").resolve())
    assert other[other.index("--train.epochs") + 1] == "5" and other[other.index("--optim.lr") + 1] == "0.1"
    probe = run_command(plan, runs["probe"], repo)
    assert probe[3:6] == ["--num_processes", "1", "/repo/scripts/train_probe.py"] and "--config" not in probe
    assert "--train.epochs" not in probe  # another script: the plan's `set` is not its flags
    assert probe[probe.index("--features") + 1] == str(out / "feats")


def test_prepare_step_runs_once_and_refuses_a_changed_command(tmp_path):
    from fgclf.sweep import prepare

    script = tmp_path / "repo" / "scripts" / "touch.py"
    script.parent.mkdir(parents=True)
    script.write_text("import sys, pathlib\na = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
                      "p = pathlib.Path(a['--output_dir']); p.mkdir(parents=True)\n(p / 'n').write_text(a['--n'])\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"feats": {"script": "scripts/touch.py", "launch": ["--num_processes", "1"],
                                                          "args": {"output_dir": "{out}/f", "n": 7}}}}))
    out = tmp_path / "out"
    prepare(load_plan(path), out, repo=tmp_path / "repo")
    assert (out / "f" / "n").read_text() == "7"
    prepare(load_plan(path), out, repo=tmp_path / "repo")  # done: not run again (mkdir would fail)
    path.write_text(path.read_text().replace("n: 7", "n: 8"))
    with pytest.raises(UserError, match="ran before with another command"):
        prepare(load_plan(path), out, repo=tmp_path / "repo")
    path.write_text(yaml.safe_dump({"prepare": {"feats": {"args": {}}}}))
    with pytest.raises(UserError, match="needs 'script'"):
        load_plan(path)


def _one_seed_plan_run_locally(tmp_path: Path, toy_root: Path) -> tuple[dict, Path]:
    """The tiny plan on seed 1 only, run by the local executor into ``tmp_path/local`` (the reference)."""
    plan = yaml.safe_load(_plan(tmp_path, toy_root).read_text())
    plan["seeds"] = [1]
    path = tmp_path / "plan1.yaml"
    path.write_text(yaml.safe_dump(plan))
    local = run_script("sweep.py", [str(path), "--output-dir", str(tmp_path / "local")])
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    return plan, path


@pytest.mark.slow  # 5 sweep runs; `make test-slow`
def test_parallel_executor_gives_the_local_summary_and_survives_a_failed_run(toy_root, tmp_path):
    """2 runs at once (each with half the cores) summarise as one after another; a run that fails is
    reported, the others finish, and the sweep exits 1."""
    plan, path = _one_seed_plan_run_locally(tmp_path, toy_root)
    plan["variants"]["bad"] = {"optim.lr": -1}
    path.write_text(yaml.safe_dump(plan))
    par = run_script("sweep.py", [str(path), "--output-dir", str(tmp_path / "par"), "--executor", "parallel",
                                  "--parallel", "2"])
    assert par.returncode == 1 and "bad seed=1: FAILED with exit status" in par.stderr, par.stderr[-3000:]
    assert "optim.lr must be > 0" in (tmp_path / "par" / "bad" / "seed1" / "sweep.log").read_text()
    rows = {}
    for name in ("local", "par"):
        summary = json.loads((tmp_path / name / "comparison" / "summary.json").read_text())
        rows[name] = {(r["group"], r["metric"]): r["mean"] for r in summary["summaries"]}
    assert set(rows["par"]) == set(rows["local"])  # the failed variant is not in the summary
    for key, value in rows["local"].items():
        assert rows["par"][key] == pytest.approx(value, abs=1e-4), key


def test_executor_options_and_slots():
    from fgclf.sweep import resolve_executor, run_slots

    assert resolve_executor({}) == {"name": "local"}
    assert resolve_executor({"executor": {"name": "parallel", "parallel": 4}}, gpus_per_run=2) == {
        "name": "parallel", "parallel": 4, "gpus_per_run": 2}
    with pytest.raises(UserError, match="executor local has no option parallel"):
        resolve_executor({}, parallel=2)
    with pytest.raises(UserError, match="unknown executor 'slurmm'"):
        resolve_executor({"executor": "slurmm"})
    assert run_slots(2, 2, 4) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(UserError, match="needs 6 GPUs; this node has 4"):
        run_slots(3, 2, 4)
    assert resolve_executor({"executor": {"name": "slurm", "partition": "gpu"}}, name="local") == {"name": "local"}
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = "2,3,5,7"  # the GPUs this process was given: the slots take them
    try:
        assert run_slots(2, 2, 4) == [{"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "5,7"}]
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    cpu = run_slots(2, 1, 0)
    assert len(cpu) == 2 and all(int(s["OMP_NUM_THREADS"]) >= 1 for s in cpu)


@pytest.mark.slow  # 6 sweep runs, 2 resumed; `make test-slow`
def test_slurm_executor_through_submitit_resubmits_and_resumes_to_the_local_summary(toy_root, tmp_path):
    """The slurm executor on submitit's local cluster: every job gets SLURM's time-limit warning (SIGUSR2)
    after update 2, writes last/ and stops; the sweep submits it again, it resumes, and the summary equals
    the local executor's. --status names each run's state and job."""
    plan, path = _one_seed_plan_run_locally(tmp_path, toy_root)
    plan["executor"] = {"name": "slurm", "cluster": "local", "time_min": 10, "max_retries": 1}
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "slurm"
    proc = run_script("sweep.py", [str(path), "--output-dir", str(out)], env={"FGCLF_DEBUG_SIGNAL_AT_STEP": "2:USR2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("submitting again, resuming from its last checkpoint") == 2
    for variant in ("ce", "smooth"):
        logs = "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.err"))
        assert "stopped by SIGUSR2" in logs
        np.testing.assert_allclose(np.load(out / variant / "seed1" / "predictions.npz")["logits"],
                                   np.load(tmp_path / "local" / variant / "seed1" / "predictions.npz")["logits"],
                                   atol=1e-5)
    rows = {}
    for name in ("local", "slurm"):
        summary = json.loads((tmp_path / name / "comparison" / "summary.json").read_text())
        rows[name] = {(r["group"], r["metric"]): r["mean"] for r in summary["summaries"]}
    assert rows["slurm"] == pytest.approx(rows["local"], abs=1e-5)
    status = run_script("sweep.py", [str(path), "--output-dir", str(out), "--status"])
    jobs = json.loads((out / ".submitit" / "jobs.json").read_text())
    assert status.returncode == 0 and status.stdout.count("| done |") == 2
    assert all(f"| {job['job_id']} | 2 |" in status.stdout for job in jobs.values())


def test_sbatch_script_carries_the_plans_resources(tmp_path, monkeypatch):
    """The generated sbatch script (submitit's, with a stand-in srun so it can be made off a cluster), and
    the multi-node launch settings each task adds from its SLURM environment."""
    pytest.importorskip("submitit")
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{__import__('os').environ['PATH']}")
    from fgclf.sweep import PlannedRun
    from fgclf.sweep_slurm import SweepJob, make_executor

    options = {"name": "slurm", "cluster": "slurm", "partition": "gpu", "time_min": 240, "nodes": 2,
               "gpus_per_node": 4, "cpus_per_task": 16, "mem_gb": 64, "account": "lab"}
    text = make_executor(tmp_path, options, "fgsweep")._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("--partition=gpu", "--time=240", "--nodes=2", "--gpus-per-node=4", "--cpus-per-task=16",
                 "--mem=64GB", "--account=lab", "--ntasks-per-node=1", "--job-name=fgsweep", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in text, line
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[3-4]", "SLURM_NODEID": "1",
                       "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    plan = {"name": "p", "launch": ["--config_file", "cfg.yaml"]}
    cmd = SweepJob(plan, PlannedRun("ce", 1, None, tmp_path / "ce" / "seed1", {}, {}), tmp_path, nodes=2).command()
    launch = cmd[cmd.index("accelerate.commands.launch") + 1:]
    assert launch[:8] == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "gpu3",
                          "--main_process_port", "29500"] and launch[8:10] == ["--config_file", "cfg.yaml"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _search_plan(tmp_path: Path, toy_root: Path, **search) -> Path:
    plan = yaml.safe_load(_plan(tmp_path, toy_root).read_text())
    del plan["variants"]
    plan["seeds"] = [1]
    plan["search"] = {"space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
                      "trials": 2, "sampler": "random", "pruner": "none", **search}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow  # 3 trials and 2 seeded runs; `make test-slow`
def test_search_resumes_its_study_and_the_best_config_reproduces_its_trial(toy_root, tmp_path):
    """Two random-sampler trials at once (the parallel executor), then baseline and the best trial re-run
    over the seeds: the best
    config's run gives its trial's validation value; a stopped search (a trial left running) goes on
    to the trials it lacks and nothing finished runs again."""
    import optuna
    from optuna.trial import TrialState

    from fgclf.search import trial_value

    path, out = _search_plan(tmp_path, toy_root), tmp_path / "out"
    proc = run_script("sweep.py", [str(path), "--output-dir", str(out), "--executor", "parallel", "--parallel", "2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    best = study.best_trial
    assert best.value == max(t.value for t in trials)
    trial_dir = out / "search" / f"trial{best.number}"
    best_epoch = json.loads((trial_dir / "metrics.json").read_text())["best_epoch"]
    row = [json.loads(x) for x in (trial_dir / "metrics.jsonl").read_text().splitlines()][best_epoch - 1]
    assert best.value == pytest.approx(row["val/top1"]) == pytest.approx(trial_value(trial_dir, "val/top1"))
    config = yaml.safe_load((out / "search" / "best.yaml").read_text())
    assert config["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
    rerun = out / f"best_trial{best.number}" / "seed1"
    assert trial_value(rerun, "val/top1") == pytest.approx(best.value, abs=1e-9)  # the same run again
    assert (out / "comparison" / "summary.json").is_file() and (out / "baseline" / "seed1" / "metrics.json").is_file()
    left = study.ask()  # a trial left running, as a search killed on this host leaves it
    left.set_user_attr("worker", f"{__import__('fgclf.search', fromlist=['x'])._machine()}:{_dead_pid()}")
    plan = yaml.safe_load(path.read_text())
    plan["search"]["trials"] = 3
    path.write_text(yaml.safe_dump(plan))
    again = run_script("sweep.py", [str(path), "--output-dir", str(out)])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"trial {left.number} was left running by a stopped worker" in again.stdout
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}"
                                                 ).get_trials()]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    assert "search: trial 3 {" in again.stdout and "search: trial 4" not in again.stdout  # the one it lacked
    assert "baseline seed=1: done, skipped" in again.stdout
    lrs = [t.params["optim.lr"] for t in optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}").get_trials(states=(TrialState.COMPLETE,))]
    assert len(set(lrs)) == 3  # the restarted sampler does not draw its first points again


def test_pruned_trials_stop_early_and_are_recorded_as_pruned(toy_root, tmp_path):
    """A pruner that prunes at the first report: the run is stopped long before its 20 epochs end and the
    trial is PRUNED; with no trial finished the sweep says so in one line."""
    import optuna
    from optuna.trial import TrialState

    plan = yaml.safe_load(_search_plan(tmp_path, toy_root, trials=1,
                                       pruner={"name": "threshold", "lower": 2.0}).read_text())
    plan["set"]["train.epochs"] = 20  # tiny epochs: long enough for the pruner to stop it well before the end
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    proc = run_script("sweep.py", [str(path), "--output-dir", str(out)])
    assert proc.returncode == 2 and "no trial finished (all pruned or failed)" in proc.stderr.strip().splitlines()[-1]
    trial = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}").get_trials()[0]
    assert trial.state == TrialState.PRUNED
    lines = (out / "search" / "trial0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) < 20 and not (out / "search" / "trial0" / "metrics.json").exists()


@pytest.mark.parametrize("space,message", [
    ({"optim.learning_rate": {"type": "float", "low": 0.1, "high": 1}}, "'optim.learning_rate' is not a setting"),
    ({"optim.lr": {"type": "float", "low": 1, "high": 0.1}}, "with low < high"),
    ({"optim.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}, "log needs low > 0")])
def test_search_plan_errors_are_one_line_before_anything_starts(toy_root, tmp_path, space, message):
    plan = yaml.safe_load(_search_plan(tmp_path, toy_root).read_text())
    plan["search"]["space"] = space
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(plan))
    proc = run_script("sweep.py", [str(path), "--output-dir", str(tmp_path / "out")])
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_slurm_time_limit_signal_reaches_the_training_before_the_requeue(tmp_path):
    """submitit calls SweepJob.checkpoint on SLURM's warning: the run's process group gets SIGUSR2 (the
    training writes last/ and exits), the job waits for it, and requeues a fresh, picklable job."""
    import pickle
    import subprocess
    import sys
    import time

    pytest.importorskip("submitit")
    from fgclf.sweep import PlannedRun
    from fgclf.sweep_slurm import SweepJob

    job = SweepJob({"name": "p"}, PlannedRun("ce", 1, None, tmp_path / "ce" / "seed1", {}, {}), tmp_path)
    code = ("import signal, sys, time\nsignal.signal(signal.SIGUSR2, lambda *a: sys.exit(7))\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    job._proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert job._proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    again = job.checkpoint()
    assert job._proc.returncode == 7 and time.monotonic() - start < 30
    fresh = pickle.loads(pickle.dumps(again.function))
    assert isinstance(fresh, SweepJob) and fresh._proc is None and fresh.run.run_dir == job.run.run_dir


def test_search_plans_a_study_does_not_fit_are_refused(toy_root, tmp_path):
    from fgclf.search import open_study
    from fgclf.sweep import load_plan

    plan = load_plan(_search_plan(tmp_path, toy_root))
    open_study(plan, tmp_path / "out")
    plan["search"]["space"]["optim.lr"]["high"] = 0.5
    with pytest.raises(UserError, match="holds a search with another space"):
        open_study(plan, tmp_path / "out")
    path = _search_plan(tmp_path, toy_root, workers=2)
    spec = yaml.safe_load(path.read_text())
    for executor, message in (({"name": "slurm", "cluster": "local", "nodes": 2}, "executor nodes must be 1"),
                              ("parallel", "search workers is the slurm executor's number of search jobs")):
        spec["executor"] = executor
        path.write_text(yaml.safe_dump(spec))
        proc = run_script("sweep.py", [str(path), "--output-dir", str(tmp_path / "s")])
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()


def _workers_of(out: Path) -> dict[int, str]:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}")
    return {t.number: t.user_attrs["worker"] for t in study.get_trials(states=(TrialState.COMPLETE,))}


@pytest.mark.slow  # 3-4 trials and 2 seeded runs; `make test-slow`
def test_a_second_worker_shares_the_study_and_the_sweep_waits_for_it(toy_root, tmp_path):
    """`sweep.py --search-only` beside the sweep: both run trials of one study (no trial run twice, none
    marked failed), the study ends with its 3 trials (plus at most the one a worker was finishing), and
    the sweep picks the best only after every trial ended."""
    import subprocess
    import sys

    import optuna

    from conftest import REPO, REPO_PYTHONPATH

    path, out = _search_plan(tmp_path, toy_root, trials=3), tmp_path / "out"
    env = {**__import__("os").environ, "PYTHONPATH": REPO_PYTHONPATH}
    helper = subprocess.Popen([sys.executable, str(REPO / "scripts" / "sweep.py"), str(path), "--output-dir", str(out),
                               "--search-only"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    proc = run_script("sweep.py", [str(path), "--output-dir", str(out)], env={"PYTHONUNBUFFERED": "1"})  # a process of its own
    helper_out = helper.communicate(timeout=600)[0]
    assert proc.returncode == 0 and helper.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + helper_out
    workers = _workers_of(out)
    assert 3 <= len(workers) <= 4 and len(set(workers.values())) == 2
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}")
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert f"best_trial{study.best_trial.number}" in (out / "comparison" / "summary.md").read_text()
    assert "trials done (" in helper_out


@pytest.mark.slow  # 3-4 trials in 2 jobs and 2 seeded runs; `make test-slow`
def test_slurm_search_workers_share_the_study(toy_root, tmp_path):
    """search: {workers: 2} on the slurm executor (submitit's local cluster): two jobs run trials of one
    study, then baseline and the best trial run as jobs and are compared; --status counts the trials."""
    path = _search_plan(tmp_path, toy_root, trials=3, workers=2)
    spec = yaml.safe_load(path.read_text())
    spec["executor"] = {"name": "slurm", "cluster": "local", "time_min": 10}
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = run_script("sweep.py", [str(path), "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = _workers_of(out)
    assert 3 <= len(workers) <= 4 and len(set(workers.values())) == 2
    jobs = json.loads((out / ".submitit" / "jobs.json").read_text())
    assert {"search/worker0", "search/worker1"} <= set(jobs) and len(jobs) == 4  # 2 workers, baseline, best
    assert (out / "comparison" / "summary.json").is_file()
    status = run_script("sweep.py", [str(path), "--output-dir", str(out), "--status"])
    assert f"search: {len(workers)} of 3 trials done ({len(workers)} complete)" in status.stdout


def test_trials_of_dead_workers_are_failed_and_live_workers_trials_kept(toy_root, tmp_path):
    """Several workers share a study: opening it fails a running trial whose worker process is gone from
    this host, or whose heartbeat is older than the grace period (a worker on another host), or that was
    asked for long ago and never started; a live local worker's trial, another host's trial with a fresh
    heartbeat and one just asked for are left running."""
    import datetime
    import os
    import socket
    import sqlite3

    import optuna
    from optuna.trial import TrialState

    from fgclf.search import GRACE_S, _machine, open_study
    from fgclf.sweep import load_plan

    plan = load_plan(_search_plan(tmp_path, toy_root))
    out = tmp_path / "out"
    study = open_study(plan, out)
    host = _machine()
    workers = {"dead_here": f"{host}:{_dead_pid()}", "live_here": f"{host}:{os.getpid()}",
               "stale_there": "node-elsewhere:11", "fresh_there": "node-elsewhere:12", "never_started": None,
               "just_asked": None, "same_name_other_container": f"{socket.gethostname()}/x/1:{_dead_pid()}"}
    number = {}
    for name, worker in workers.items():
        trial = study.ask()
        number[name] = trial.number
        if worker:
            trial.set_user_attr("worker", worker)
        study._storage.record_heartbeat(trial._trial_id)
    long_ago = datetime.timedelta(seconds=GRACE_S + 60)
    with sqlite3.connect(out / "search" / "study.db") as db:  # the database keeps UTC heartbeats, local starts
        db.execute("UPDATE trial_heartbeats SET heartbeat = ? WHERE trial_id = ?",
                   (str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - long_ago),
                    study.trials[number["stale_there"]]._trial_id))
        db.execute("UPDATE trials SET datetime_start = ? WHERE number = ?",
                   (str(datetime.datetime.now() - long_ago), number["never_started"]))
    open_study(plan, out)  # as another worker (or a restarted sweep) opens it
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search' / 'study.db'}").trials
    assert {name: trials[n].state for name, n in number.items()} == {
        "dead_here": TrialState.FAIL, "live_here": TrialState.RUNNING, "stale_there": TrialState.FAIL,
        "fresh_there": TrialState.RUNNING, "never_started": TrialState.FAIL, "just_asked": TrialState.RUNNING,
        "same_name_other_container": TrialState.RUNNING}  # its process ids are not ours to check


def test_search_worker_passes_slurms_warning_to_its_trial_and_requeues(tmp_path):
    """A search worker job on SLURM's time-limit warning: its running trial's process group gets SIGUSR2 and
    is waited for; the requeued worker is a fresh, picklable SearchWorker of the same plan."""
    import pickle
    import subprocess
    import sys

    pytest.importorskip("submitit")
    from fgclf import search
    from fgclf.sweep_slurm import SearchWorker

    code = ("import signal, sys, time\nsignal.signal(signal.SIGUSR2, lambda *a: sys.exit(7))\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    search.LIVE[proc.pid] = proc
    try:
        again = SearchWorker({"name": "p"}, tmp_path / "out", tmp_path).checkpoint()
    finally:
        search.LIVE.pop(proc.pid, None)
    assert proc.returncode == 7  # its handler ran: it was told, and waited for
    fresh = pickle.loads(pickle.dumps(again.function))
    assert isinstance(fresh, SearchWorker) and fresh.out_dir == tmp_path / "out" and fresh.plan == {"name": "p"}


def test_search_storage_puts_the_study_in_another_database(toy_root, tmp_path):
    """search.storage: the study lives in the named database, not in <out>/search/study.db, and the
    best-trial lookup and --status read it there."""
    from fgclf.search import best_trial, open_study, study_status
    from fgclf.sweep import load_plan

    shared = tmp_path / "shared" / "studies.db"
    shared.parent.mkdir()
    plan = load_plan(_search_plan(tmp_path, toy_root, storage=f"sqlite:///{shared}"))
    study = open_study(plan, tmp_path / "out")
    trial = study.ask()
    study.tell(trial, 0.5)
    assert shared.is_file() and not (tmp_path / "out" / "search" / "study.db").exists()
    assert best_trial(plan, tmp_path / "out").value == 0.5
    assert study_status(plan, tmp_path / "out") == "search: 1 of 2 trials done (1 complete)"
    bad = load_plan(_search_plan(tmp_path, toy_root, storage="postgresql://nobody@127.0.0.1:1/none"))
    with pytest.raises(UserError, match="cannot open the study at postgresql"):
        open_study(bad, tmp_path / "out2")
