"""Training tricks end to end, in runs that look like real ones: a BatchNorm model, the ``basic``
augmentation preset, 2 loader workers and AdamW at 3e-3.

The runs go through ``train_classifier.main`` in this process (a subprocess would add seconds of
imports and prove nothing more here); the distributed claims (class-balanced loss on 2 processes)
run under ``accelerate launch``.

- Early stopping on top-1 (maximised) stops where the rule says, and the test metrics come from
  the best epoch's weights.
- Focal loss with gamma > 0 trains differently from cross-entropy; gamma = 0 is cross-entropy.
- Mixup with prob > 0 mixes images *and* targets: at Beta(alpha -> 0) every batch is either left
  alone or swapped whole with its flip, so the run equals the plain one, which it could not if
  images and targets were mixed inconsistently; mixup 0.8 / cutmix 1.0 at prob 0.8 really mix, and
  evaluation never does.
- Class-balanced cross-entropy on imbalanced data (10/6/4/2 train images per class): 2 processes
  equal 1 (the weighted mean is over the global batch, not each process's; the last incomplete
  batch is dropped, which accelerate would otherwise fill up on 2 processes only), and it is not
  the unweighted run. A GroupNorm model without augmentation here, so that nothing but the loss's
  normalisation can make 2 processes differ from 1.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_ARGS, last_error_line, train_toy

REAL = ("--model.name", "test_efficientnet", "--data.num_workers", "2", "--data.aug.preset", "basic",
        "--optim.lr", "0.003", "--train.seed", "5")


@lru_cache(maxsize=None)
def _script():
    spec = importlib.util.spec_from_file_location("_script_train_classifier_tricks",
                                                  REPO / "scripts" / "train_classifier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _train(toy_root: Path, out: Path, *extra: str) -> Path:
    argv = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, *REAL,
            "--train.output_dir", str(out), *extra]
    assert _script().main(argv) == 0
    return out


def _history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "best" / "model.safetensors"))


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def ce_run(toy_root, tmp_path_factory):
    return _train(toy_root, tmp_path_factory.mktemp("tricks") / "ce", "--train.epochs", "2")


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_on_top1_stops_by_the_rule_and_tests_the_best_epoch(toy_root, tmp_path):
    from fgclf.data import create_dataset, create_transform
    from fgclf.metrics import compute_metrics
    from fgclf.models import create_model

    patience, epochs = 2, 12
    run = _train(toy_root, tmp_path / "es", "--train.epochs", str(epochs), "--train.early_stopping_metric", "top1",
                 "--train.early_stopping_patience", str(patience))
    hist = _history(run)
    best, best_epoch, bad, stop = None, None, 0, epochs
    for h in hist:  # the rule, replayed: improvement = strictly larger (maximised), min_delta 0
        if best is None or h["val/top1"] > best:
            best, best_epoch, bad = h["val/top1"], h["epoch"], 0
        else:
            bad += 1
            if bad >= patience:
                stop = h["epoch"]
                break
    assert stop < epochs, "this run must stop early for the test to see the rule"
    assert [h["epoch"] for h in hist] == list(range(1, stop + 1))
    assert best_epoch < stop and hist[best_epoch - 1]["val/top1"] == max(h["val/top1"] for h in hist)
    m = _metrics(run)
    assert m["best_epoch"] == best_epoch and m["stopped_early"] is True
    # best/ holds the best epoch's weights: its val metrics, recomputed here, are that epoch's
    best_dir = run / "checkpoints" / "best"
    meta = json.loads((best_dir / "config.json").read_text())
    model = create_model(f"file:{best_dir}", num_classes=meta["num_classes"]).eval()
    tf = create_transform(meta["data_config"], is_training=False)
    for split, expected in (("val", {k[4:]: v for k, v in hist[best_epoch - 1].items() if k.startswith("val/")}),
                            ("test", m)):
        ds = create_dataset(format="cub", root=str(toy_root), split=split, val_fraction=0.15, transform=tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = np.array([ds[i][1] for i in range(len(ds))])
        with torch.no_grad():
            logits = model(x).numpy()
        got = compute_metrics(logits, y, num_classes=meta["num_classes"])
        assert got["top1"] == pytest.approx(expected["top1"], abs=1e-9), split
        loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
        assert loss == pytest.approx(expected["loss"], abs=1e-4), split


# ----------------------------------------------------------------------------- focal loss
def test_focal_gamma_positive_trains_differently_and_gamma_zero_is_ce(ce_run, toy_root, tmp_path):
    focal0 = _train(toy_root, tmp_path / "focal0", "--train.epochs", "2", "--loss.name", "focal", "--loss.gamma", "0")
    focal2 = _train(toy_root, tmp_path / "focal2", "--train.epochs", "2", "--loss.name", "focal", "--loss.gamma", "2")
    ce, f0, f2 = (_history(r) for r in (ce_run, focal0, focal2))
    # gamma 0: the same run (the option routes to the loss and nothing else changes)
    np.testing.assert_allclose([h["train_loss"] for h in f0], [h["train_loss"] for h in ce], rtol=1e-6)
    assert _max_weight_diff(focal0, ce_run) < 1e-6
    # gamma 2: (1 - p_true)^2 < 1 scales every sample's CE down (from the same initial weights and batch)
    assert f2[0]["train_loss"] < ce[0]["train_loss"] - 0.05, (f2[0]["train_loss"], ce[0]["train_loss"])
    assert _max_weight_diff(focal2, ce_run) > 1e-3


# ----------------------------------------------------------------------------- mixup / cutmix
@pytest.fixture
def lam_log(monkeypatch):
    """Every batch's mixing ratio, as the training loop's MixupCutmix reports it."""
    from fgclf.data.mixup import MixupCutmix

    seen, call = [], MixupCutmix.__call__

    def spy(self, images, labels):
        out = call(self, images, labels)
        seen.append(self.last_lam)
        return out

    monkeypatch.setattr(MixupCutmix, "__call__", spy)
    return seen


def test_mixup_at_alpha_to_zero_swaps_whole_batches_and_equals_the_plain_run(ce_run, toy_root, tmp_path, lam_log):
    # (cutmix has no such limit: its box is clipped at the border, so even lam -> 0 keeps part of the image)
    run = _train(toy_root, tmp_path / "mix0", "--train.epochs", "2", "--mixup.alpha", "1e-4", "--mixup.prob", "1.0")
    lams = np.array(lam_log)
    assert len(lams) == 8  # 2 epochs x 4 batches
    assert np.all((lams < 1e-6) | (lams > 1 - 1e-6)), lams
    assert (lams < 0.5).any() and (lams > 0.5).any(), lams  # some batches really were swapped
    # a swapped batch is the same batch in reverse order with its targets reversed: same loss, same update
    # (a reversed batch sums its gradients in another order; AdamW turns that rounding into lr-sized steps of
    # parameters whose gradients are ~0, e.g. BatchNorm biases, so the weights agree only to ~1e-2, not 1e-6)
    np.testing.assert_allclose([h["train_loss"] for h in _history(run)], [h["train_loss"] for h in _history(ce_run)],
                               rtol=1e-5)
    assert _metrics(run)["loss"] == pytest.approx(_metrics(ce_run)["loss"], abs=1e-3)


def test_mixup_cutmix_with_prob_mix_for_real(ce_run, toy_root, tmp_path, lam_log):
    run = _train(toy_root, tmp_path / "mix", "--train.epochs", "2", "--mixup.alpha", "0.8",
                 "--mixup.cutmix_alpha", "1.0", "--mixup.prob", "0.8")
    lams = np.array(lam_log)  # cutmix: box-corrected
    assert len(lams) == 8 and ((lams > 0.05) & (lams < 0.95)).sum() >= 3, lams
    assert _max_weight_diff(run, ce_run) > 1e-3
    # evaluation never mixes: the test loss is cross-entropy of the saved logits on the true labels
    npz = np.load(run / "predictions.npz")
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(npz["logits"]), torch.from_numpy(npz["labels"])))
    assert loss == pytest.approx(_metrics(run)["loss"], abs=1e-5)


# ----------------------------------------------------------------------------- class-balanced loss
@pytest.fixture(scope="module")
def imbalanced_root(toy_root, tmp_path_factory) -> Path:
    """An ImageFolder copy of the toy data with 10, 6, 4 and 2 train images per class (test: all 5)."""
    from fgclf.data import create_dataset

    root = tmp_path_factory.mktemp("imbalanced")
    keep = [10, 6, 4, 2]
    for split in ("train", "test"):
        ds = create_dataset(format="cub", root=str(toy_root), split=split, val_fraction=0.0)
        taken = [0] * 4
        for path, label in zip(ds.records.items, ds.records.labels):
            if split == "train" and taken[label] >= keep[label]:
                continue
            taken[label] += 1
            dest = root / split / f"class_{label}" / Path(path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    return root


def test_class_balanced_loss_two_processes_equal_one(imbalanced_root, tmp_path):
    common = ("--data.format", "imagefolder", "--data.root", str(imbalanced_root), "--data.val_fraction", "0",
              "--data.aug.preset", "none", "--train.epochs", "2", "--optim.lr", "0.01",
              "--loss.class_balance", "inverse")
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    train_toy(imbalanced_root, one, *common)
    train_toy(imbalanced_root, two, *common, nproc=2)
    train_toy(imbalanced_root, plain, *common[:-2])
    h1, h2, hp = (_history(r) for r in (one, two, plain))
    assert [h["samples"] for h in h1] == [h["samples"] for h in h2] == [16, 16]  # 22 train: the last 6 dropped
    np.testing.assert_allclose([h["train_loss"] for h in h2], [h["train_loss"] for h in h1], rtol=1e-5)
    assert _max_weight_diff(one, two) < 1e-4
    np.testing.assert_allclose(np.load(one / "predictions.npz")["logits"], np.load(two / "predictions.npz")["logits"],
                               atol=1e-4)
    assert abs(hp[0]["train_loss"] - h1[0]["train_loss"]) > 1e-3  # the weights change the loss


def test_a_train_split_smaller_than_the_batch_is_refused_before_training(toy_root, tmp_path):
    proc = train_toy(toy_root, tmp_path / "big", "--train.batch_size", "64", check=False)
    assert proc.returncode == 2 and last_error_line(proc) == (
        "error: the train split has 32 images, fewer than train.batch_size 64, so every batch would be dropped; "
        "lower train.batch_size or set train.drop_last false")
    assert not (tmp_path / "big" / "checkpoints").exists()
