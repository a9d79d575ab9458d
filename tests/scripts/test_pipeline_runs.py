"""``train_classifier.py --parallel pipeline`` on 2 gloo processes, against one plain process.

The tiny model has GroupNorm, so microbatching changes nothing and a 2-stage pipelined run must
give the single-process run's numbers (the library-level test in tests/test_pipeline.py checks
BatchNorm models against a same-microbatching reference).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_metrics_match_sklearn, export_logits, last_error_line, train_toy as _train

PIPE = ("--parallel", "pipeline", "--pp.microbatches", "2")
COMMON = ("--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01")


@pytest.fixture(scope="module")
def one_process(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pp") / "one"
    _train(toy_root, out, *COMMON)
    return out


@pytest.mark.slow  # ~3 min; the step itself equals one process in tests/test_pipeline.py (default suite)
def test_pipeline_run_matches_one_process(toy_root, one_process, tmp_path):
    out = tmp_path / "pp"
    proc = _train(toy_root, out, *COMMON, *PIPE, "--pp.schedule", "1f1b", nproc=2)
    assert "pipeline: stage 0" in proc.stdout
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (one_process, out))
    for key in ("top1", "f1_macro", "auroc_macro", "loss"):
        assert abs(one[key] - two[key]) < 1e-4, (key, one[key], two[key])
    h1, h2 = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one_process, out))
    np.testing.assert_allclose([h["train_loss"] for h in h2], [h["train_loss"] for h in h1], rtol=1e-5)
    np.testing.assert_allclose([h["val/loss"] for h in h2], [h["val/loss"] for h in h1], rtol=1e-5)
    assert_metrics_match_sklearn(out, num_classes=4, num_samples=20)
    # the gathered stages are one ordinary model file that reproduces the pipelined test logits
    np.testing.assert_allclose(export_logits(out, toy_root), np.load(out / "predictions.npz")["logits"], atol=1e-5)
    np.testing.assert_allclose(np.load(one_process / "predictions.npz")["logits"],
                               np.load(out / "predictions.npz")["logits"], atol=1e-3)  # as the DDP test: sum order
    stages = yaml.safe_load((out / "config.yaml").read_text())["run"]["pipeline_stages"]
    assert [s["stage"] for s in stages] == [0, 1] and stages[0]["units"][1] == stages[1]["units"][0]


@pytest.mark.slow  # the pipeline step equality and 1f1b run stay in the default suite
def test_pipeline_kill_then_resume_matches_uninterrupted(toy_root, tmp_path):
    common = (*COMMON, *PIPE, "--train.epochs", "3", "--data.aug.preset", "basic", "--train.checkpoint_every_steps", "1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _train(toy_root, ref, *common, nproc=2)
    killed = _train(toy_root, cut, *common, nproc=2, env={"FGCLF_DEBUG_KILL_AT_STEP": "6"}, check=False)
    assert killed.returncode != 0
    state = json.loads((cut / "checkpoints/last/trainer_state.json").read_text())
    assert (state["epoch"], state["global_step"]) in ((1, 5), (1, 6))  # mid-epoch 2, whatever the kill raced
    resumed = _train(toy_root, cut, *common, "--resume", "last", nproc=2)
    assert "resumed from" in resumed.stdout
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, cut))
    for key in ("top1", "f1_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    np.testing.assert_allclose(np.load(ref / "predictions.npz")["logits"], np.load(cut / "predictions.npz")["logits"],
                               atol=1e-5)


@pytest.mark.parametrize("extra, nproc, message", [
    (("--pp.microbatches", "3"), 1, "must be a multiple of pp.microbatches 3"),
    (("--peft", "lora"), 1, "--parallel pipeline trains the whole model"),
    pytest.param(("--pp.stages", "3"), 2, "pp.stages is 3 but accelerate started 2 processes", marks=pytest.mark.slow),
    ((), 1, "--parallel pipeline needs one process per stage"),
    pytest.param(("--model.name", "test_convnext"), 2, "splits timm ResNet, EfficientNet and ViT models",
                 marks=pytest.mark.slow),  # (2 launched processes each: slow)
])
def test_pipeline_user_errors(toy_root, tmp_path, extra, nproc, message):
    out = tmp_path / "run"
    proc = _train(toy_root, out, *PIPE, *extra, nproc=nproc, check=False)
    assert proc.returncode != 0 and message in last_error_line(proc), proc.stderr[-2000:]
    assert not out.exists()


def test_pipeline_full_disk_while_saving_keeps_the_previous_checkpoint(toy_root, tmp_path):
    """ENOSPC in the 2nd write of `last` (end of epoch 2) on both stages: one-line error naming the intact
    previous checkpoint (epoch 1), the temporary folder removed."""
    import os

    out = tmp_path / "run"
    proc = _train(toy_root, out, *COMMON, *PIPE, "--train.epochs", "3", nproc=2, check=False,
                  env={"FGCLF_DEBUG_FAIL_SAVE": "2"})
    assert proc.returncode != 0
    last = out / "checkpoints" / "last"
    error = last_error_line(proc)
    assert error.startswith(f"error: could not write checkpoint {last}: ") and "No space left on device" in error
    assert error.endswith(f"; the previous checkpoint at {last} is intact"), error
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "last"]
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 1
