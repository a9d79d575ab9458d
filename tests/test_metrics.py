"""fgclf.metrics against scikit-learn on small seeded cases (CPU, well under a second each)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn import metrics as skm

from fgclf.errors import UserError
from fgclf.metrics import (compute_metrics, confusion_matrix, create_metrics, format_metrics_table,
                           list_metrics, per_class_metrics)


# ---------------------------------------------------------------- scikit-learn references
def _sk_top_k(k: int):
    def reference(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
        k_eff = min(k, num_classes)
        if num_classes == 2:  # sklearn's binary path wants 1-D scores (k_eff == 2: every sample hits)
            return skm.top_k_accuracy_score(labels, scores[:, 1] - scores[:, 0], k=k_eff, labels=[0, 1])
        # sklearn ranks tied scores towards the higher class index, fgclf (like argmax) towards the
        # lower one: reversing the class order makes the two rules the same.
        return skm.top_k_accuracy_score(num_classes - 1 - labels, scores[:, ::-1], k=k_eff,
                                        labels=range(num_classes))
    return reference


def _sk_prf(index: int):
    def reference(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
        return skm.precision_recall_fscore_support(labels, scores.argmax(1), labels=range(num_classes),
                                                   average="macro", zero_division=0)[index]
    return reference


def _sk_auroc(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """roc_auc_score(ovr) when every class is present, else the mean over the defined classes."""
    probs = softmax(scores, axis=1)
    present = np.unique(labels)
    if len(present) == num_classes:
        if num_classes == 2:
            return skm.roc_auc_score(labels, probs[:, 1])
        return skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                 labels=range(num_classes))
    if len(present) < 2:
        return float("nan")
    return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))


SKLEARN_REFERENCES = {
    "top1": lambda s, y, c: skm.accuracy_score(y, s.argmax(1)),
    "top5": _sk_top_k(5),
    "precision_macro": _sk_prf(0),
    "recall_macro": _sk_prf(1),
    "f1_macro": _sk_prf(2),
    "balanced_accuracy": lambda s, y, c: skm.balanced_accuracy_score(y, s.argmax(1)),
    "auroc_macro": _sk_auroc,
}


# ---------------------------------------------------------------- seeded cases
def _signal(rng, labels, num_classes, strength=1.0):
    logits = rng.normal(size=(len(labels), num_classes))
    logits[np.arange(len(labels)), labels] += strength  # better than chance, not perfect
    return logits


def _case(name: str):
    rng = np.random.default_rng(sum(map(ord, name)))  # stable seed per case
    if name == "balanced_c10":
        labels = np.repeat(np.arange(10), 20)
        return _signal(rng, labels, 10), labels, 10
    if name == "imbalanced_c10":
        p = 0.6 ** np.arange(10)
        labels = rng.choice(10, size=150, p=p / p.sum())
        labels[:10] = np.arange(10)  # every class present, the tail ones once
        return _signal(rng, labels, 10, 1.5), labels, 10
    if name == "binary":
        labels = rng.integers(0, 2, 60)
        return _signal(rng, labels, 2, 0.8), labels, 2
    if name == "c3_k_clamped":
        labels = rng.integers(0, 3, 40)
        return _signal(rng, labels, 3), labels, 3
    if name == "no_predictions":
        labels = rng.integers(0, 5, 80)
        logits = _signal(rng, labels, 5)
        logits[:, 4] -= 100.0  # class 4 is present but never predicted
        return logits, labels, 5
    if name == "no_support":
        labels = rng.integers(0, 5, 90)  # classes 5 and 6 have no support
        logits = _signal(rng, labels, 7)
        logits[:, 5] += 1.0  # class 5 is predicted now and then (false positives only)
        logits[:, 6] -= 100.0  # class 6: no support and no predictions (tp + fp + fn == 0)
        return logits, labels, 7
    if name == "ties":
        pool = rng.normal(size=(6, 8))
        for row in pool[:5]:  # tie the top two and the values around the top-5 boundary
            order = np.argsort(-row)
            row[order[1]] = row[order[0]]
            row[order[3:7]] = row[order[3]]
        pool[5] = 0.5  # one row with every class tied
        labels = np.concatenate([np.arange(8), rng.integers(0, 8, 112)])
        return pool[rng.integers(0, 6, 120)], labels, 8
    raise KeyError(name)


CASES = ["balanced_c10", "imbalanced_c10", "binary", "c3_k_clamped", "no_predictions", "no_support", "ties"]


def _sklearn(name, logits, labels, num_classes):
    with warnings.catch_warnings():  # k >= n_classes, classes absent from y_true, ...
        warnings.simplefilter("ignore")
        return SKLEARN_REFERENCES[name](logits, labels, num_classes)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list_metrics())
def test_metric_equals_sklearn(name, case):
    assert name in SKLEARN_REFERENCES, f"add a scikit-learn reference for the new metric {name!r}"
    logits, labels, num_classes = _case(case)
    ours = compute_metrics(logits, labels, num_classes=num_classes, names=[name])[name]
    assert ours == pytest.approx(_sklearn(name, logits, labels, num_classes), abs=1e-6)


def test_every_reference_is_registered():
    assert set(SKLEARN_REFERENCES) == set(list_metrics())


def test_cases_cover_what_they_claim():
    logits, labels, _ = _case("no_support")
    preds = logits.argmax(1)
    assert 5 in preds and 5 not in labels and 6 not in preds and 6 not in labels
    logits, labels, _ = _case("no_predictions")
    assert 4 in labels and 4 not in logits.argmax(1)
    logits, _, _ = _case("ties")
    assert (np.sort(logits, 1)[:, -1] == np.sort(logits, 1)[:, -2]).all()


def test_top_k_tie_rule_and_clamping():
    logits = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    labels = np.array([0, 1])
    out = compute_metrics(logits, labels, num_classes=3, names=["top1", "top5"])
    assert out == {"top1": 0.5, "top5": 1.0}  # the tie goes to class 0; top5 is top3 here


def test_auroc_nan_when_only_one_class_present():
    logits = np.random.default_rng(0).normal(size=(10, 4))
    out = compute_metrics(logits, np.full(10, 2), num_classes=4)
    assert np.isnan(out["auroc_macro"]) and out["top1"] == skm.accuracy_score(np.full(10, 2), logits.argmax(1))


def test_torch_and_numpy_inputs_agree():
    logits, labels, num_classes = _case("imbalanced_c10")
    a = compute_metrics(logits, labels, num_classes=num_classes)
    b = compute_metrics(torch.from_numpy(logits), torch.from_numpy(labels), num_classes=num_classes)
    assert a == b and list(a) == list_metrics()


def test_create_metrics_subset_keeps_order():
    fn = create_metrics(["f1_macro", "top1", "f1_macro"])
    logits, labels, num_classes = _case("binary")
    assert list(fn(logits, labels, num_classes)) == ["f1_macro", "top1"]


@pytest.mark.parametrize("wrong, suggestion", [("top_1", "top1"), ("f1_marco", "f1_macro")])
def test_unknown_metric_suggests_close_match(wrong, suggestion):
    with pytest.raises(UserError, match=f"Did you mean {suggestion}") as info:
        create_metrics(["top1", wrong])
    assert "Available: " in str(info.value) and "auroc_macro" in str(info.value)


@pytest.mark.parametrize("logits, labels", [
    (np.zeros((4, 3)), np.array([0, 1, 2, 3])),  # label out of range
    (np.zeros((4, 2)), np.array([0, 1, 1, 0])),  # wrong number of columns
    (np.zeros((4, 3)), np.array([0, 1, 2])),  # length mismatch
    (np.zeros((0, 3)), np.zeros(0, dtype=int)),  # empty
    (np.full((2, 3), np.nan), np.array([0, 1])),  # nan logits
])
def test_bad_inputs_raise_user_error(logits, labels):
    with pytest.raises(UserError):
        compute_metrics(logits, labels, num_classes=3)


@pytest.mark.parametrize("case", CASES)
def test_confusion_matrix_and_per_class_equal_sklearn(case):
    logits, labels, num_classes = _case(case)
    preds = logits.argmax(1)
    expected = skm.confusion_matrix(labels, preds, labels=range(num_classes))
    for source in (logits, preds, torch.from_numpy(preds)):
        cm = confusion_matrix(source, labels, num_classes=num_classes)
        assert cm.dtype == np.int64 and (cm == expected).all()
    names = [f"c{i}" for i in range(num_classes)]
    rows = per_class_metrics(logits, labels, num_classes=num_classes, class_names=names)
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=range(num_classes),
                                                     average=None, zero_division=0)
    assert [row["class_name"] for row in rows] == names
    assert [row["class_id"] for row in rows] == list(range(num_classes))
    np.testing.assert_allclose([row["precision"] for row in rows], p, atol=1e-12)
    np.testing.assert_allclose([row["accuracy"] for row in rows], r, atol=1e-12)
    np.testing.assert_allclose([row["f1"] for row in rows], f, atol=1e-12)
    assert [row["support"] for row in rows] == s.tolist()


def test_format_metrics_table_is_aligned():
    text = format_metrics_table({"top1": 0.5, "auroc_macro": 0.123456, "num_samples": 12,
                                 "split": "test", "per_class": [1, 2]}, title="test")
    lines = text.splitlines()
    assert lines[0] == "test" and set(lines[1]) == {"-"}
    body = lines[2:]
    assert [line.split()[0] for line in body] == ["top1", "auroc_macro", "num_samples"]
    assert [line.split()[1] for line in body] == ["0.5000", "0.1235", "12"]
    assert len({len(line) for line in body}) == 1  # right-aligned values end in one column
    assert all(line.startswith(f"{line.split()[0]:<11}  ") for line in body)  # names left-aligned
