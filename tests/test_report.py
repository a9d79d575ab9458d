"""fgclf.report: the evaluation files of a run directory, checked against scikit-learn."""
from __future__ import annotations

import csv
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import softmax
from sklearn import metrics as skm

from fgclf.errors import UserError
from fgclf.metrics import list_metrics
from fgclf.report import (append_jsonl, plot_curves, read_jsonl, save_confusion_matrix,
                          write_evaluation)

NUM_CLASSES = 24  # > 20, so report.md has separate best/worst tables
NAMES = [f"bird {i}" for i in range(NUM_CLASSES - 2)] + ['tern, "arctic"', "gull|herring"]


def _inputs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(NUM_CLASSES), rng.integers(0, NUM_CLASSES, n - NUM_CLASSES)])
    logits = rng.normal(size=(n, NUM_CLASSES)).astype(np.float32)
    logits[np.arange(n), labels] += 1.5
    logits[:, -1] -= 10.0  # the last class ("gull|herring") is never predicted: it is in the worst 10
    return torch.from_numpy(logits), torch.from_numpy(labels)


HISTORY = [{"epoch": e, "train_loss": 2.0 / (e + 1), "lr": 1e-3 * 0.5**e, "val/loss": 2.2 / (e + 1),
            "val/top1": 0.2 * e, "val/f1_macro": 0.15 * e} for e in range(4)]


def _open_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100
        return image.size


def test_write_evaluation_round_trip(tmp_path):
    logits, labels = _inputs()
    ids = [f"img_{i:03d}" for i in range(len(labels))]
    returned = write_evaluation(tmp_path, logits=logits, labels=labels, class_names=NAMES,
                                history=HISTORY, split="test", extra={"checkpoint": "best"},
                                image_ids=ids)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == returned
    assert (metrics["num_samples"], metrics["split"], metrics["num_classes"], metrics["checkpoint"]) == (
        len(labels), "test", NUM_CLASSES, "best")
    assert set(list_metrics()) <= set(metrics)

    npz = np.load(tmp_path / "predictions.npz", allow_pickle=False)
    assert npz["logits"].dtype == np.float32 and npz["probs"].dtype == np.float32
    assert npz["labels"].dtype == np.int64
    assert npz["class_names"].tolist() == NAMES and npz["image_ids"].tolist() == ids
    y, scores = npz["labels"], npz["logits"].astype(np.float64)
    np.testing.assert_allclose(npz["probs"], softmax(scores, axis=1), atol=1e-6)
    np.testing.assert_array_equal(npz["logits"], logits.numpy())

    preds = scores.argmax(1)
    p, r, f, _ = skm.precision_recall_fscore_support(y, preds, labels=range(NUM_CLASSES),
                                                     average="macro", zero_division=0)
    expected = {
        "top1": skm.accuracy_score(y, preds),
        "top5": skm.top_k_accuracy_score(y, scores, k=5, labels=range(NUM_CLASSES)),
        "precision_macro": p, "recall_macro": r, "f1_macro": f,
        "balanced_accuracy": skm.balanced_accuracy_score(y, preds),
        "auroc_macro": skm.roc_auc_score(y, softmax(scores, axis=1), multi_class="ovr",
                                         labels=range(NUM_CLASSES)),
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name

    cm = skm.confusion_matrix(y, preds, labels=range(NUM_CLASSES))
    assert metrics["confusion_matrix"] == cm.tolist()
    with open(tmp_path / "confusion_matrix.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == NAMES and [row[0] for row in table[1:]] == NAMES
    np.testing.assert_array_equal(np.array([row[1:] for row in table[1:]], dtype=np.int64), cm)

    pc, rc, fc, sc = skm.precision_recall_fscore_support(y, preds, labels=range(NUM_CLASSES),
                                                         average=None, zero_division=0)
    with open(tmp_path / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["class_name"] for row in rows] == NAMES
    np.testing.assert_allclose([float(row["accuracy"]) for row in rows], rc, atol=1e-9)
    np.testing.assert_allclose([float(row["precision"]) for row in rows], pc, atol=1e-9)
    np.testing.assert_allclose([float(row["f1"]) for row in rows], fc, atol=1e-9)
    assert [int(row["support"]) for row in rows] == sc.tolist()
    assert [row["accuracy"] for row in metrics["per_class"]] == pytest.approx(rc.tolist(), abs=1e-9)

    _open_png(tmp_path / "confusion_matrix.png")
    _open_png(tmp_path / "curves.png")
    report = (tmp_path / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"curves.png", "confusion_matrix.png", "metrics.json", "predictions.npz"} <= set(links)
    for link in links:
        assert (tmp_path / link).is_file(), link
    assert "### Best 10" in report and "### Worst 10" in report and "gull\\|herring" in report
    table_rows = [line for line in report.splitlines() if line.startswith("| ") and "class_id" not in line]
    assert len(table_rows) == 20 and all(len(re.split(r"(?<!\\)\|", row)) == 8 for row in table_rows)  # 6 cells
    assert f"{metrics['top1']:.4f}" in report
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_write_evaluation_without_history_or_ids(tmp_path):
    logits, labels = _inputs(n=30, seed=1)
    write_evaluation(tmp_path, logits=logits.numpy(), labels=labels.numpy(), class_names=NAMES)
    assert not (tmp_path / "curves.png").exists()
    assert "curves.png" not in (tmp_path / "report.md").read_text()
    assert "image_ids" not in np.load(tmp_path / "predictions.npz").files


def test_write_evaluation_rejects_bad_inputs(tmp_path):
    logits, labels = _inputs(n=30)
    with pytest.raises(UserError, match="class names"):
        write_evaluation(tmp_path, logits=logits, labels=labels, class_names=NAMES[:-1])
    with pytest.raises(ValueError, match="overwrite"):
        write_evaluation(tmp_path, logits=logits, labels=labels, class_names=NAMES, extra={"top1": 1.0})


def test_large_confusion_matrix_png(tmp_path):
    n = 120  # no cell text, names still shown
    cm = np.random.default_rng(0).integers(0, 5, size=(n, n)) + np.eye(n, dtype=np.int64) * 20
    cm[3] = 0  # a class without support must not divide by zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_confusion_matrix(cm, [f"species {i}" for i in range(n)], tmp_path)
    width, height = _open_png(tmp_path / "confusion_matrix.png")
    assert width > 1000 and height > 1000


def test_plot_curves_skips_missing(tmp_path):
    assert plot_curves([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}],
                       tmp_path / "a.png")
    _open_png(tmp_path / "a.png")
    assert not plot_curves([{"epoch": 0, "note": "x"}, {"epoch": 1, "train_loss": float("nan")}],
                           tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


def test_jsonl_round_trip_and_truncated_tail(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    records = [{"epoch": 0, "train_loss": np.float32(0.5), "val/top1": torch.tensor(0.25)},
               {"epoch": 1, "lr": 1e-4, "name": "a\nb"}]
    for record in records:
        append_jsonl(path, record)
    assert len(path.read_text().splitlines()) == 2
    assert read_jsonl(path) == [{"epoch": 0, "train_loss": 0.5, "val/top1": 0.25},
                                {"epoch": 1, "lr": 1e-4, "name": "a\nb"}]
    with open(path, "a") as fh:
        fh.write('{"epoch": 2, "train_')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="truncated"):
        assert len(read_jsonl(path)) == 2
    append_jsonl(path, {"epoch": 3})  # starts on a fresh line
    with pytest.raises(UserError, match=":3:"):  # a bad line that is not the last one
        read_jsonl(path)
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
