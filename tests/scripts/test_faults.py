"""Faults during training: stop signals, kill -9 at random moments (inside checkpoint writes too),
a full disk, non-finite losses and a failing process.

Every run is train_classifier.py on the toy dataset with the tiny model (conftest TINY_ARGS):
3 epochs of 4 updates (32 train images, batch 8), no augmentation and ``last`` written after every
update, so that a run resumed from any checkpoint must end exactly (1e-6) where the
uninterrupted reference run ends. Faults are injected by the FGCLF_DEBUG_* test hooks of
fgclf.runtime.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARGS, last_error_line, run_script

from fgclf.checkpoint_paths import find_last

COMMON = ("--train.epochs", "3", "--data.aug.preset", "none", "--optim.lr", "0.01",
          "--train.checkpoint_every_steps", "1")
# global_step of each write of `last` in order: one per update, plus one at each epoch end
SAVES = [1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 12]
KILL_SEED = int(os.environ.get("FGCLF_TEST_KILL_SEED", "20261128"))  # another value explores other points


def _train(toy_root: Path, out: Path, *extra: str, env: dict | None = None, nproc: int = 1, timeout: int = 600):
    args = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--train.output_dir", str(out),
            *COMMON, *extra]
    return run_script("train_classifier.py", args, nproc=nproc, env=env, timeout=timeout)


def _resume(toy_root: Path, out: Path) -> None:
    proc = _train(toy_root, out, "--resume", "last")
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def _saved_state(out: Path) -> dict:
    """trainer_state.json of the newest complete checkpoint (last, or last.old after a kill between renames)."""
    path = find_last(out)
    assert path is not None, f"no complete checkpoint in {out}: {sorted(os.listdir(out / 'checkpoints'))}"
    return json.loads((path / "trainer_state.json").read_text())


def _assert_same_result(ref: Path, out: Path, what: str = "") -> None:
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    for key in ("top1", "top5", "f1_macro", "auroc_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), f"{what}: {key}"
    np.testing.assert_allclose(np.load(ref / "predictions.npz")["logits"], np.load(out / "predictions.npz")["logits"],
                               atol=1e-5, err_msg=what)
    ha, hb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out))
    assert [h["epoch"] for h in hb] == [1, 2, 3], what
    np.testing.assert_allclose([h["val/loss"] for h in hb], [h["val/loss"] for h in ha], atol=1e-6, err_msg=what)
    left = sorted(os.listdir(out / "checkpoints"))
    assert left == ["best", "last"], f"{what}: {left}"  # no temporary or set-aside folder stays behind


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = _train(toy_root, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("signame, step, code, resume", [
    ("TERM", 7, 143, True),
    pytest.param("INT", 4, 130, False, marks=pytest.mark.slow),  # the same path with another signal
])
def test_stop_signal_finishes_the_update_writes_last_and_resume_matches(toy_root, reference, tmp_path,
                                                                       signame, step, code, resume):
    """SIGTERM/SIGINT: the update in progress ends, `last` holds it, exit 128 + signal with a message;
    --resume last ends where the uninterrupted run ends (checked for SIGTERM; SIGINT takes the same
    path). Update 4 is the last of epoch 1, before its validation."""
    out = tmp_path / "run"
    proc = _train(toy_root, out, env={"FGCLF_DEBUG_SIGNAL_AT_STEP": f"{step}:{signame}"})
    assert proc.returncode == code, proc.stderr[-3000:]
    epoch = (step - 1) // 4 + 1
    assert (f"stopped by SIG{signame} at epoch {epoch}, update {step}; checkpoint written to "
            f"{out / 'checkpoints' / 'last'}; continue with --resume last") in proc.stderr
    assert not (out / "metrics.json").exists()  # no test evaluation
    state = _saved_state(out)
    assert (state["global_step"], state["step_in_epoch"]) == (step, (step - 1) % 4 + 1)
    if resume:
        _resume(toy_root, out)
        _assert_same_result(reference, out, f"SIG{signame} after update {step}")


def test_stop_signal_to_the_process_group_spares_the_loader_workers(toy_root, tmp_path):
    """SIGTERM to the whole process group (as Ctrl-C or a job scheduler sends it) reaches the
    DataLoader workers too: they leave it to the training process, which stops gracefully
    (before, a worker died and the run crashed with "DataLoader worker ... killed")."""
    import subprocess
    import sys

    from conftest import REPO, REPO_PYTHONPATH

    out = tmp_path / "run"
    args = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--train.output_dir", str(out), *COMMON,
            "--data.num_workers", "2"]
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "FGCLF_DEBUG_SIGNAL_AT_STEP": "6:TERM:group"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_classifier.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)  # its own group
    assert proc.returncode == 143, proc.stderr[-3000:]
    last = out / "checkpoints" / "last"
    assert f"stopped by SIGTERM at epoch 2, update 6; checkpoint written to {last}" in proc.stderr
    assert _saved_state(out)["global_step"] == 6


def _kill_points(rng: random.Random) -> list[tuple[str, int]]:
    """Five moments: SIGKILL after an update (2), inside a write of `last` after its state files
    are written (2), and between the two renames that swap it in (1)."""
    after = rng.sample(range(1, 12), 2)
    inside = rng.sample(range(2, len(SAVES) + 1), 3)  # the first write has no earlier checkpoint to keep
    return ([("after update", k) for k in after] + [("inside write", n) for n in inside[:2]]
            + [("between renames", inside[2])])


def _kill_then_resume(toy_root: Path, out: Path, reference: Path, kind: str, n: int) -> None:
    what = f"SIGKILL {kind} {n} (seed {KILL_SEED})"
    env = {"after update": {"FGCLF_DEBUG_KILL_AT_STEP": str(n)}, "inside write": {"FGCLF_DEBUG_KILL_IN_SAVE": str(n)},
           "between renames": {"FGCLF_DEBUG_KILL_IN_SAVE": f"{n}:swap"}}[kind]
    killed = _train(toy_root, out, env=env)
    assert killed.returncode == -9, f"{what}: {killed.returncode} {killed.stderr[-2000:]}"
    expected = n if kind == "after update" else SAVES[n - 2]  # the write before the interrupted one
    assert _saved_state(out)["global_step"] == expected, what
    ckpt = out / "checkpoints"
    if kind == "inside write":
        assert (ckpt / ".last.tmp").is_dir() and not (ckpt / ".last.tmp/trainer_state.json").exists(), what
    if kind == "between renames":
        assert not (ckpt / "last").exists() and find_last(out) == ckpt / "last.old", what
    _resume(toy_root, out)
    _assert_same_result(reference, out, what)


@pytest.mark.slow  # 3 kills at random updates; the fixed-update kill/signal resumes stay in the default suite
def test_kill_at_random_moments_then_resume_matches_uninterrupted(toy_root, reference, tmp_path):
    """kill -9 at five seeded-random moments, two of them in the middle of a checkpoint write and one
    between its renames: the previous complete checkpoint is found every time, and each resumed run
    ends with the uninterrupted run's metrics and predictions. Two runs at a time (2 CPU cores)."""
    points = _kill_points(random.Random(KILL_SEED))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_kill_then_resume, toy_root, tmp_path / f"cut{i}", reference, kind, n)
                   for i, (kind, n) in enumerate(points)]
        for future in futures:
            future.result()


def test_full_disk_while_saving_keeps_the_previous_checkpoint(toy_root, reference, tmp_path):
    """ENOSPC in the middle of the 6th write of `last` (update 5): the run stops with a one-line error
    naming the cause and the intact previous checkpoint (epoch 1's end); nothing written is lost."""
    out = tmp_path / "run"
    proc = _train(toy_root, out, env={"FGCLF_DEBUG_FAIL_SAVE": "6"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = out / "checkpoints" / "last"
    error = last_error_line(proc)
    assert error.startswith(f"error: could not write checkpoint {last}: No space left on device (")
    assert error.endswith(f"; the previous checkpoint at {last} is intact"), error
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "last"]  # the temporary folder is gone
    assert _saved_state(out)["global_step"] == 4
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    _resume(toy_root, out)
    _assert_same_result(reference, out, "ENOSPC in write 6")


def test_nonfinite_losses_stop_the_run_naming_them_and_the_last_good_checkpoint(toy_root, reference, tmp_path):
    """nan losses from update 5 on: the 4th in a row (train.max_nonfinite_steps 3) stops the run with
    exit 2; `last` was not written after the first of them, and resuming from it (without the fault)
    ends like the reference run."""
    out = tmp_path / "run"
    proc = _train(toy_root, out, env={"FGCLF_DEBUG_NAN_AT_STEP": "5"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = out / "checkpoints" / "last"
    assert last_error_line(proc).startswith(
        "error: non-finite training loss (nan/inf) at updates 5-8 (more than train.max_nonfinite_steps=3 in a "
        f"row); the last good checkpoint is {last} (update 4, end of epoch 1)")
    assert _saved_state(out)["global_step"] == 4
    _resume(toy_root, out)
    _assert_same_result(reference, out, "nan from update 5")


@pytest.mark.slow  # tests/scripts/test_realistic_runs.py signals process 1 of 2 and resumes, in the default suite
def test_signal_reaching_one_process_stops_all_at_the_same_update(toy_root, tmp_path):
    """2 gloo processes, SIGTERM to process 1 only after update 6: both agree at the next update's
    poll, `last` holds update 7 and the launcher fails with the stop message shown."""
    out = tmp_path / "run"
    proc = _train(toy_root, out, nproc=2, env={"FGCLF_DEBUG_SIGNAL_AT_STEP": "6", "FGCLF_DEBUG_RANK": "1"})
    assert proc.returncode != 0, proc.stderr[-3000:]
    last = out / "checkpoints" / "last"
    assert f"stopped by SIGTERM at epoch 2, update 7; checkpoint written to {last}" in proc.stderr
    assert _saved_state(out)["global_step"] == 7
    assert re.search(r"exitcode\s*:\s*143", proc.stderr), proc.stderr[-3000:]  # the launcher's summary


def test_failing_process_stops_the_others_with_its_error_shown(toy_root, tmp_path):
    """Process 1 raises after update 3 of 2: the launcher ends non-zero well within the timeout (no hang),
    with the error in its output."""
    start = time.monotonic()
    proc = _train(toy_root, tmp_path / "run", nproc=2, env={"FGCLF_DEBUG_RAISE_AT_STEP": "3", "FGCLF_DEBUG_RANK": "1"},
                  timeout=180)  # a hang raises TimeoutExpired
    assert proc.returncode != 0
    assert "RuntimeError: FGCLF_DEBUG_RAISE_AT_STEP: failure injected on process 1 after update 3" in proc.stderr
    assert time.monotonic() - start < 120


# ----------------------------------------------------------------------------- in-process pieces
def test_run_guard_counts_nonfinite_updates_across_polls():
    """Flags are read only at polls; a run of nan updates is counted across them, named by its first
    and last update, and `last` may be written only after a finite update."""
    import torch

    from fgclf.engine import RunGuard
    from fgclf.runtime import create_accelerator

    guard = RunGuard(create_accelerator(log_with=None), max_nonfinite_steps=2, check_every=3)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    found = []
    for step, loss in enumerate([one, nan, nan, one, nan, nan, nan, nan, one], start=1):
        guard.observe(loss)
        guard.observe(one)  # a second micro-batch of the same update: the update counts as non-finite
        guard.end_update(step)
        if guard.due(step):
            found.append((step, guard.poll(), guard.can_save))
    # updates 2-3 are within the limit; 5-7 is the first run longer than 2 (seen at the poll after 9)
    assert found == [(3, None, False), (6, None, False), (9, (5, 7), True)]
    assert RunGuard(create_accelerator(log_with=None), max_nonfinite_steps=0).check_every == 1  # CPU: every update


def test_replace_dir_fsyncs_and_a_kill_between_its_renames_leaves_a_complete_copy(tmp_path, monkeypatch):
    import fgclf.runtime
    from fgclf.utils import replace_dir

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))

    def write(name: str, text: str) -> Path:
        tmp = tmp_path / "checkpoints" / name
        (tmp / "state").mkdir(parents=True)
        (tmp / "state" / "model.bin").write_text(text)
        (tmp / "trainer_state.json").write_text(json.dumps({"text": text}))
        return tmp

    last = tmp_path / "checkpoints" / "last"
    tmp = write(".last.tmp", "one")
    replace_dir(tmp, last)  # files fsynced before the rename, the folder holding the new name after it
    assert set(synced[:-1]) == {str(tmp / "state" / "model.bin"), str(tmp / "trainer_state.json"), str(tmp),
                                str(tmp / "state")}
    assert synced[-1] == str(last.parent)

    class Killed(Exception):
        pass

    def kill_between_renames(point, path=None):
        if point == "replace_dir":
            raise Killed
    monkeypatch.setattr(fgclf.runtime, "debug_fault", kill_between_renames)
    with pytest.raises(Killed):
        replace_dir(write(".last.tmp", "two"), last)
    assert not last.exists() and find_last(tmp_path) == last.with_name("last.old")  # "one", complete
    monkeypatch.undo()
    # the run resumed from last.old writes again (Checkpointer clears the stale temporary folder first):
    # last.old, the only complete copy, may go only once the new `last` is in place
    shutil.rmtree(tmp)
    replace_dir(write(".last.tmp", "three"), last)
    assert sorted(os.listdir(last.parent)) == ["last"] and (last / "state" / "model.bin").read_text() == "three"


def test_fit_with_no_nonfinite_tolerance_stops_at_the_first(tmp_path):
    """max_nonfinite_steps=0 in the engine itself (in-process, a linear model): the first nan loss ends
    fit with the update and the last good checkpoint named; that checkpoint is the update before."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from fgclf.checkpoint import Checkpointer
    from fgclf.engine import FitOptions, NonFiniteLoss, TrainState, fit
    from fgclf.optim import create_scheduler
    from fgclf.runtime import create_accelerator

    torch.manual_seed(0)
    acc = create_accelerator(log_with=None)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_scheduler(opt, name="constant", epochs=3, updates_per_epoch=3)
    data = TensorDataset(torch.randn(30, 5), torch.arange(30) % 3)
    model, opt, train = acc.prepare(model, opt, DataLoader(data, batch_size=10))
    meta = {"model_name": "linear", "num_classes": 3, "class_names": list("abc"), "model_kwargs": {}, "peft": None}
    ck = Checkpointer(acc, tmp_path, meta=meta)
    ck.save_best = lambda m, s: None  # plain nn.Linear is not an exportable timm model
    calls = 0

    def loss_fn(logits, labels):
        nonlocal calls
        calls += 1
        return F.cross_entropy(logits, labels) * (float("nan") if calls >= 5 else 1.0)

    with pytest.raises(NonFiniteLoss) as err:
        fit(acc, model, train, None, opt, sched, loss_fn, state=TrainState(), checkpointer=ck, run_dir=tmp_path,
            num_classes=3, options=FitOptions(epochs=3, checkpoint_every_steps=1, max_nonfinite_steps=0))
    assert str(err.value).startswith("non-finite training loss (nan/inf) at update 5 (more than "
                                     "train.max_nonfinite_steps=0 in a row); the last good checkpoint is "
                                     f"{tmp_path / 'checkpoints' / 'last'} (update 4, in epoch 2)")
    assert json.loads((tmp_path / "checkpoints/last/trainer_state.json").read_text())["global_step"] == 4
