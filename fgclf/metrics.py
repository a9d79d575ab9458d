"""Classification metrics over full (already gathered) logits, equal to scikit-learn's.

Every scalar metric is a function of one :class:`MetricInputs` (float64 logits ``(N, C)``,
int64 labels ``(N,)``), registered by name with :func:`register_metric`. Counts and curves come
from ``torchmetrics.functional``; the divisions and averages are done here in float64 so that
each value equals scikit-learn's with ``labels=range(C)`` to 1e-6 (``tests/test_metrics.py``).

Conventions a user should know:

- Predictions are ``argmax`` of the logits; ties go to the lowest class index.
- ``top1``/``top5``: a sample is a hit when its true class ranks among the first ``k`` (``k``
  clamped to ``C``), ranking by score with ties to the lower class index, so ``top1`` equals the
  accuracy of the argmax predictions. (sklearn's ``top_k_accuracy_score`` breaks ties towards
  the higher index; the tests compare with it on column-reversed scores.)
- ``precision_macro``/``recall_macro``/``f1_macro`` average over all ``C`` classes; a class with
  no support or no predictions scores 0 (sklearn ``zero_division=0``). torchmetrics' own
  ``average="macro"`` leaves out classes with ``tp + fp + fn == 0``, so it is not used.
- ``balanced_accuracy``: mean recall over the classes that have support (sklearn's definition).
- ``auroc_macro``: one-vs-rest AUROC of the softmax probabilities, averaged over the classes
  that have both positives and negatives in ``labels`` (nan if none). When every class is
  present this is ``roc_auc_score(multi_class="ovr")``. torchmetrics computes the curve from
  float64 scores but divides in float32, so this one metric is exact to about 1e-7.
"""
from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_auroc, multiclass_confusion_matrix

from fgclf.errors import UserError

MetricFn = Callable[["MetricInputs"], float]
_METRICS: dict[str, MetricFn] = {}


@dataclass
class MetricInputs:
    """Validated inputs shared by all metrics of one call; derived tensors are cached."""

    logits: Tensor  # (N, C) float64
    labels: Tensor  # (N,) int64
    num_classes: int

    @cached_property
    def preds(self) -> Tensor:
        """Argmax predictions (first maximum on ties)."""
        return self.logits.argmax(dim=1)

    @cached_property
    def probs(self) -> Tensor:
        """Softmax probabilities, float64."""
        return torch.softmax(self.logits, dim=1)

    @cached_property
    def confusion(self) -> Tensor:
        """Confusion matrix, rows = true class, columns = predicted class, int64."""
        return multiclass_confusion_matrix(self.preds, self.labels, self.num_classes).long()

    @cached_property
    def per_class(self) -> dict[str, Tensor]:
        """Per-class support, precision, recall and F1 (float64, zero where undefined)."""
        cm = self.confusion.double()
        tp, pred_count, support = cm.diagonal(), cm.sum(0), cm.sum(1)
        return {
            "support": support,
            "precision": _safe_div(tp, pred_count),
            "recall": _safe_div(tp, support),
            "f1": _safe_div(2 * tp, pred_count + support),  # = 2PR/(P+R), sklearn's formula
        }


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (sklearn's ``zero_division=0``)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def prepare_inputs(logits: Any, labels: Any, num_classes: int) -> MetricInputs:
    """Check shapes and ranges and convert to float64 logits and int64 labels on the CPU.

    Raises:
        UserError: on wrong shapes, empty input, non-finite logits or labels outside ``[0, C)``.
    """
    logits, labels = _as_tensor(logits), _as_tensor(labels)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise UserError(f"logits must have shape (N, {num_classes}), got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise UserError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise UserError("cannot compute metrics on zero samples")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"labels must be integers, got {labels.dtype}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    logits = logits.double()
    if not torch.isfinite(logits).all():
        raise UserError("logits contain nan or inf")
    return MetricInputs(logits, labels, int(num_classes))


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering ``fn(inputs: MetricInputs) -> float`` under ``name``."""

    def decorator(fn: MetricFn) -> MetricFn:
        if name in _METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        _METRICS[name] = fn
        return fn

    return decorator


def list_metrics() -> list[str]:
    """Names of all registered scalar metrics, sorted."""
    return sorted(_METRICS)


def _topk_accuracy(inp: MetricInputs, k: int) -> float:
    """Fraction of samples whose true class ranks < k (ties ranked by lower class index)."""
    k = min(k, inp.num_classes)
    scores, labels = inp.logits, inp.labels
    true_score = scores.gather(1, labels[:, None])
    index = torch.arange(inp.num_classes)[None, :]
    ahead = (scores > true_score) | ((scores == true_score) & (index < labels[:, None]))
    return (ahead.sum(1) < k).double().mean().item()


@register_metric("top1")
def top1(inp: MetricInputs) -> float:
    """Accuracy of the argmax prediction."""
    return _topk_accuracy(inp, 1)


@register_metric("top5")
def top5(inp: MetricInputs) -> float:
    """Top-5 accuracy (top-C when C < 5)."""
    return _topk_accuracy(inp, 5)


@register_metric("precision_macro")
def precision_macro(inp: MetricInputs) -> float:
    """Unweighted mean precision over all C classes."""
    return inp.per_class["precision"].mean().item()


@register_metric("recall_macro")
def recall_macro(inp: MetricInputs) -> float:
    """Unweighted mean recall over all C classes (classes without support count as 0)."""
    return inp.per_class["recall"].mean().item()


@register_metric("f1_macro")
def f1_macro(inp: MetricInputs) -> float:
    """Unweighted mean F1 over all C classes."""
    return inp.per_class["f1"].mean().item()


@register_metric("balanced_accuracy")
def balanced_accuracy(inp: MetricInputs) -> float:
    """Mean recall over the classes present in ``labels``."""
    has_support = inp.per_class["support"] > 0
    return inp.per_class["recall"][has_support].mean().item()


@register_metric("auroc_macro")
def auroc_macro(inp: MetricInputs) -> float:
    """One-vs-rest AUROC on softmax probabilities, mean over classes with positives and negatives."""
    support = inp.per_class["support"]
    valid = (support > 0) & (support < inp.labels.numel())
    if not valid.any():
        return math.nan
    with warnings.catch_warnings():  # torchmetrics warns about absent classes; they are dropped
        warnings.simplefilter("ignore")
        per_class = multiclass_auroc(inp.probs, inp.labels, inp.num_classes, average="none",
                                     thresholds=None)
    return per_class.double()[valid].mean().item()


def create_metrics(names: list[str] | None = None) -> Callable[[Any, Any, int], dict[str, float]]:
    """Return ``fn(logits, labels, num_classes) -> {name: value}`` for ``names`` (default: all).

    Raises:
        UserError: for an unknown name, with the closest registered names.
    """
    available = list_metrics()
    names = available if names is None else list(dict.fromkeys(names))
    for name in names:
        if name not in _METRICS:
            close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown metric {name!r}.{hint} Available: {', '.join(available)}")
    fns = {name: _METRICS[name] for name in names}

    def compute(logits: Any, labels: Any, num_classes: int) -> dict[str, float]:
        inp = prepare_inputs(logits, labels, num_classes)
        return {name: float(fn(inp)) for name, fn in fns.items()}

    return compute


def compute_metrics(logits: Any, labels: Any, *, num_classes: int,
                    names: list[str] | None = None) -> dict[str, float]:
    """Compute the named scalar metrics (default: all) from torch tensors or numpy arrays.

    Args:
        logits: ``(N, C)`` scores (logits or probabilities; argmax and ranks are the same).
        labels: ``(N,)`` integer class ids in ``[0, C)``.
        num_classes: ``C``.
        names: metric names from :func:`list_metrics`; ``None`` for all.
    Returns:
        ``{name: float}`` in the order of ``names``.
    """
    return create_metrics(names)(logits, labels, num_classes)


def confusion_matrix(logits_or_preds: Any, labels: Any, *, num_classes: int) -> np.ndarray:
    """Confusion matrix ``(C, C)``, rows = true class, columns = predicted class, int64.

    Accepts logits ``(N, C)`` (argmax is taken) or predicted class ids ``(N,)``.
    """
    x = _as_tensor(logits_or_preds)
    if x.ndim == 1:
        labels_t = _as_tensor(labels)
        if x.is_floating_point() or x.shape != labels_t.shape:
            raise UserError(f"predictions must be integer ids shaped like labels, got {tuple(x.shape)}")
        if x.numel() and (x.min() < 0 or x.max() >= num_classes):
            raise UserError(f"predictions must lie in [0, {num_classes})")
        x = torch.nn.functional.one_hot(x.long(), num_classes)  # argmax of one-hot = the ids
    return prepare_inputs(x, labels, num_classes).confusion.numpy().astype(np.int64)


def per_class_metrics(logits: Any, labels: Any, *, num_classes: int,
                      class_names: list[str] | None = None) -> list[dict]:
    """One dict per class: class_id, class_name, support, accuracy (= recall), precision, f1."""
    if class_names is not None and len(class_names) != num_classes:
        raise UserError(f"got {len(class_names)} class names for {num_classes} classes")
    stats = prepare_inputs(logits, labels, num_classes).per_class
    rows = []
    for c in range(num_classes):
        rows.append({
            "class_id": c,
            "class_name": str(class_names[c]) if class_names is not None else str(c),
            "support": int(stats["support"][c]),
            "accuracy": float(stats["recall"][c]),
            "precision": float(stats["precision"][c]),
            "f1": float(stats["f1"][c]),
        })
    return rows


def level_metrics(logits: Any, labels: Any, *, of: Sequence[int], num_coarse: int,
                  names: list[str] | None = None) -> dict[str, float]:
    """The metrics at a coarser label level, from fine-level scores.

    The coarse class probabilities are the fine softmax summed over each coarse class's members
    (``of[c]``: the coarse index of fine class ``c``); their argmax is the coarse prediction, and
    every metric of :func:`compute_metrics` is computed on them (their logs as the scores, whose
    softmax gives them back). Labels are mapped with ``of``.
    """
    logits_t = _as_tensor(logits).double()
    of_t = torch.as_tensor(list(of), dtype=torch.long)
    probs = torch.softmax(logits_t, dim=1) @ torch.nn.functional.one_hot(of_t, num_coarse).double()
    coarse_labels = of_t[_as_tensor(labels).long()]
    return compute_metrics(torch.log(probs.clamp_min(1e-300)), coarse_labels, num_classes=num_coarse, names=names)


def _scalar(value: Any) -> float | int | None:
    """``value`` as a Python number when it is a real scalar (not bool), else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def format_metrics_table(metrics: dict, title: str | None = None) -> str:
    """Aligned two-column plain-text table of the scalar entries of ``metrics`` (4 decimals).

    Non-scalar entries (lists, dicts, strings) are left out; integers print without decimals.
    """
    rows = []
    for name, value in metrics.items():
        v = _scalar(value)
        if v is not None:
            rows.append((str(name), str(v) if isinstance(v, int) else f"{v:.4f}"))
    if not rows:
        return title or ""
    name_w = max(len(n) for n, _ in rows)
    value_w = max(len(v) for _, v in rows)
    lines = [f"{n:<{name_w}}  {v:>{value_w}}" for n, v in rows]
    if title:
        lines = [title, "-" * max(len(title), name_w + 2 + value_w)] + lines
    return "\n".join(lines)
