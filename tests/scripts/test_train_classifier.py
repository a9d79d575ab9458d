"""End-to-end tests of scripts/train_classifier.py on a tiny generated dataset.

Each compares numbers against a reference: sklearn recomputed from predictions.npz, a
single-process run, an uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (TINY_ARGS, assert_metrics_match_sklearn, export_logits as _export_logits,
                      export_model_and_test_images as _export_model_and_test_images, last_error_line, run_script,
                      train_toy as _train)


@pytest.fixture(scope="module")
def single_run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "single"
    _train(toy_root, out, "--train.epochs", "2", "--data.aug.preset", "none",
           "--optim.lr", "0.01", launch=True)
    return out


def test_run_directory_layout(single_run: Path):
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "predictions.npz", "confusion_matrix.csv",
                 "confusion_matrix.png", "per_class.csv", "curves.png", "report.md", "splits.json",
                 "checkpoints/last/trainer_state.json", "checkpoints/best/model.safetensors",
                 "checkpoints/best/config.json"):
        assert (single_run / name).exists(), name
    assert list((single_run / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard logs in the run dir"
    cfg = yaml.safe_load((single_run / "config.yaml").read_text())
    assert cfg["run"]["seed"] == 42 and "torch" in cfg["run"]["versions"] and "train_classifier.py" in cfg["run"]["command"]
    history = [json.loads(line) for line in (single_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["val/num_samples"] == 8 for h in history)  # 4 classes x 10 train x 0.15 -> 2 each


def test_metrics_json_equals_sklearn_from_predictions(single_run: Path):
    npz = assert_metrics_match_sklearn(single_run, num_classes=4, num_samples=20)
    # the predictions are the test split, in the order recorded in splits.json
    splits = json.loads((single_run / "splits.json").read_text())
    assert list(npz["image_ids"]) == splits["test"]


def test_two_processes_match_one(toy_root, single_run: Path, tmp_path):
    """DDP over 2 gloo processes with the same global batch gives the single-process numbers."""
    out = tmp_path / "ddp"
    _train(toy_root, out, "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01", nproc=2)
    one = json.loads((single_run / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    assert two["num_samples"] == one["num_samples"] == 20
    for key in ("top1", "f1_macro", "auroc_macro", "loss"):
        assert abs(one[key] - two[key]) < 1e-4, (key, one[key], two[key])
    a, b = np.load(single_run / "predictions.npz"), np.load(out / "predictions.npz")
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-3)
    h1 = [json.loads(x) for x in (single_run / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["val/num_samples"] for h in h2] == [h["val/num_samples"] for h in h1]
    np.testing.assert_allclose([h["train_loss"] for h in h2], [h["train_loss"] for h in h1], rtol=1e-4)


def test_kill_mid_epoch_then_resume_matches_uninterrupted(toy_root, tmp_path):
    """SIGKILL during epoch 2; --resume last finishes with the uninterrupted run's metrics."""
    common = ("--train.epochs", "3", "--optim.lr", "0.01")  # random augmentation stays on
    ref = tmp_path / "ref"
    _train(toy_root, ref, *common)
    cut = tmp_path / "cut"
    # 32 train images / batch 8 = 4 updates per epoch: update 6 is inside epoch 2
    killed = _train(toy_root, cut, *common, env={"FGCLF_DEBUG_KILL_AT_STEP": "6"}, check=False)
    assert killed.returncode != 0
    state = json.loads((cut / "checkpoints/last/trainer_state.json").read_text())
    assert state["epoch"] == 1 and not (cut / "metrics.json").exists()
    resumed = _train(toy_root, cut, *common, "--resume", "last")
    assert "resumed from" in resumed.stdout
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    for key in ("top1", "top5", "f1_macro", "auroc_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    np.testing.assert_allclose(np.load(ref / "predictions.npz")["logits"],
                               np.load(cut / "predictions.npz")["logits"], atol=1e-5)
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_refuses_other_class_count_and_other_settings(toy_root, tmp_path):
    import shutil

    from fgclf.data import generate_toy_cub

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(toy_root, data)
    _train(data, out, "--train.epochs", "1")
    changed = _train(data, out, "--train.epochs", "1", "--optim.lr", "0.5", "--resume", "last", check=False)
    assert changed.returncode == 2
    assert "--resume with other settings" in last_error_line(changed) and "optim.lr" in last_error_line(changed)
    shutil.rmtree(data)  # the dataset behind the same path now has 5 classes
    generate_toy_cub(data, num_classes=5, train_per_class=4, test_per_class=2, image_size=32, seed=1)
    proc = _train(data, out, "--train.epochs", "1", "--resume", "last", check=False)
    assert proc.returncode == 2
    assert "classifier size is 4 there but 5 in this run" in last_error_line(proc)
    assert (out / "metrics.json").exists()  # nothing already written was lost


def test_existing_run_directory_is_not_overwritten(toy_root, single_run):
    before = (single_run / "metrics.json").read_bytes()
    proc = _train(toy_root, single_run, check=False)
    assert proc.returncode == 2 and "already holds a run" in last_error_line(proc)
    assert (single_run / "metrics.json").read_bytes() == before


def _assert_same_test_result(run_a: Path, run_b: Path) -> None:
    a = json.loads((run_a / "metrics.json").read_text())
    b = json.loads((run_b / "metrics.json").read_text())
    assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_best_export_reproduces_the_test_predictions(single_run, toy_root):
    np.testing.assert_allclose(_export_logits(single_run, toy_root),
                               np.load(single_run / "predictions.npz")["logits"], atol=1e-4)


def test_peft_lora_run_trains_adapters_and_exports_merged(toy_root, tmp_path):
    out = tmp_path / "lora"
    _train(toy_root, out, "--peft", "lora", "--train.epochs", "1", "--optim.lr", "0.01")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    params = cfg["run"]["parameters"]
    assert 0 < params["trainable"] < params["total"] / 2
    meta = json.loads((out / "checkpoints/best/config.json").read_text())
    assert meta["peft"]["method"] == "lora" and (out / "checkpoints/best/adapter_model.safetensors").exists()
    np.testing.assert_allclose(_export_logits(out, toy_root), np.load(out / "predictions.npz")["logits"], atol=1e-4)


def test_gradient_accumulation_matches_the_big_batch(toy_root, single_run, tmp_path):
    """batch 4 x 2 accumulated micro-batches = batch 8 (GroupNorm model, no augmentation)."""
    out = tmp_path / "accum"
    _train(toy_root, out, "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--train.batch_size", "4", "--train.grad_accum_steps", "2", "--train.eval_batch_size", "8")
    a = json.loads((single_run / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "f1_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    ha = [json.loads(x) for x in (single_run / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hb] == [h["step"] for h in ha] == [4, 8]  # optimizer updates, not batches
    np.testing.assert_allclose([h["lr"] for h in hb], [h["lr"] for h in ha], rtol=1e-9)


def test_random_seed_is_recorded_and_reproduces(toy_root, tmp_path):
    first = _train(toy_root, tmp_path / "a", "--train.seed", "random", "--train.epochs", "1")
    seed = json.loads((tmp_path / "a/metrics.json").read_text())["seed"]
    assert isinstance(seed, int) and f"random seed: {seed}" in first.stdout
    assert yaml.safe_load((tmp_path / "a/config.yaml").read_text())["train"]["seed"] == seed
    _train(toy_root, tmp_path / "b", "--train.seed", str(seed), "--train.epochs", "1")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert (a["top1"], a["loss"]) == (b["top1"], b["loss"])


def test_loss_options_reach_the_loss(toy_root, single_run, tmp_path):
    """focal with gamma=0 is cross-entropy: the run reproduces the ce run."""
    _train(toy_root, tmp_path / "focal0", "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--loss.name", "focal", "--loss.gamma", "0")
    _assert_same_test_result(single_run, tmp_path / "focal0")
    cfg = yaml.safe_load((tmp_path / "focal0/config.yaml").read_text())
    assert cfg["loss"]["name"] == "focal" and cfg["loss"]["gamma"] == 0


def test_tta_flip_averages_image_and_mirror(toy_root, tmp_path):
    import torch

    out = tmp_path / "tta"
    _train(toy_root, out, "--train.epochs", "1", "--train.tta_flip", "true")
    model, x = _export_model_and_test_images(out, toy_root)
    with torch.no_grad():
        expected = ((model(x) + model(x.flip(-1))) / 2).numpy()
    np.testing.assert_allclose(np.load(out / "predictions.npz")["logits"], expected, atol=1e-4)


def test_mixup_with_probability_zero_is_plain_training(toy_root, single_run, tmp_path):
    """The soft-target path: mixup on but never firing reproduces the integer-label run."""
    _train(toy_root, tmp_path / "mix0", "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--mixup.alpha", "0.4", "--mixup.prob", "0.0")
    _assert_same_test_result(single_run, tmp_path / "mix0")


def test_torchvision_model_linear_probe_end_to_end(toy_root, tmp_path):
    """tv:resnet18 trains through the same script; only the head changes; the export reloads."""
    import torch
    from safetensors.torch import load_file

    from fgclf.models import create_model

    out = tmp_path / "tv"
    _train(toy_root, out, "--model.name", "tv:resnet18", "--model.strategy", "linear_probe", "--train.epochs", "1",
           "--optim.lr", "0.01")
    assert_metrics_match_sklearn(out, num_classes=4, num_samples=20)
    torch.manual_seed(42)  # the run's seed: the same random body
    start = create_model("tv:resnet18", num_classes=4)
    trained = load_file(str(out / "checkpoints/best/model.safetensors"))
    changed = {k for k, v in start.state_dict().items() if not torch.equal(v, trained[k])}
    assert changed == {"head.weight", "head.bias"}


def test_channels_last_and_the_image_cache_give_the_same_run(toy_root, single_run, tmp_path):
    """NHWC weights change the memory order, not the numbers; without augmentation the resized-image
    cache feeds the eval transform's pixels exactly (toy images are smaller than the cache size, and
    larger sources are covered by tests/data/test_cache.py). Both leave a loadable export."""
    out = tmp_path / "fast"
    _train(toy_root, out, "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--train.channels_last", "true", "--data.cache", "true", "--data.cache_dir", str(tmp_path / "cache"),
           "--data.decoder", "torchvision")  # decode_jpeg gives PIL's pixels: the same run
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single_run, out))
    for key in ("top1", "f1_macro"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    # NHWC convolution kernels round float32 differently; over 2 epochs the test loss drifts (seen: 2.5e-5
    # relative on an AMD EPYC); a wrong pixel or a lost update would move it by far more
    assert a["loss"] == pytest.approx(b["loss"], rel=2e-4)
    entries = list((tmp_path / "cache").rglob("*.img"))
    # each image once, as a 13-byte "read the original" marker (toy images are below the cache size)
    assert len(entries) == 60 and all(e.stat().st_size == 13 for e in entries)
    np.testing.assert_allclose(_export_logits(out, toy_root), np.load(out / "predictions.npz")["logits"], atol=1e-4)


def test_fused_optimizer_gives_the_same_run(toy_root, single_run, tmp_path):
    """--optim.fused true reaches the run's AdamW (its saved state says fused) and trains to the same
    numbers up to float rounding."""
    import torch

    out = tmp_path / "fused"
    _train(toy_root, out, "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--optim.fused", "true")
    state = torch.load(out / "checkpoints/last/state/optimizer.bin", weights_only=True)
    assert state["param_groups"] and all(g["fused"] is True for g in state["param_groups"])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single_run, out))
    for key in ("top1", "f1_macro"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


@pytest.mark.slow
def test_compiled_model_gives_the_same_run(toy_root, single_run, tmp_path):
    """--train.compile true (inductor; ~1.5 min of compiling on 2 CPU cores) trains to the same numbers."""
    out = tmp_path / "compiled"
    _train(toy_root, out, "--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--train.compile", "true")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single_run, out))
    for key in ("top1", "f1_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-3), key
    np.testing.assert_allclose(_export_logits(out, toy_root), np.load(out / "predictions.npz")["logits"], atol=1e-3)
