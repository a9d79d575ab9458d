"""Persistent loader workers (the default) and the end of the process."""
from __future__ import annotations

import json

import pytest
from conftest import run_script

RUN = ["--model.name", "test_efficientnet", "--model.pretrained", "false", "--data.image_size", "32",
       "--data.num_workers", "2", "--train.progress", "false", "--train.batch_size", "8", "--train.epochs", "2"]


def test_an_error_after_the_first_epoch_ends_the_process_with_persistent_workers(toy_root, tmp_path):
    """Persistent loader workers ignore SIGTERM; an uncaught error in epoch 2 must still end the process
    (their exit hook kills them) instead of leaving it waiting for them."""
    import subprocess

    out = tmp_path / "run"
    try:
        proc = run_script("train_classifier.py", [*RUN, "--data.format", "cub", "--data.root", str(toy_root),
                                                  "--train.output_dir", str(out)],
                          env={"FGCLF_DEBUG_RAISE_AT_STEP": "5"}, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the error")
    assert proc.returncode == 1 and "RuntimeError" in proc.stderr
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1  # it was past epoch 1
