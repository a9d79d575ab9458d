"""Ensembles of finished runs: combination rules, and whether the members are "good and different".

Members are test-set predictions of the same images in the same order (``predictions.npz`` of a
run directory, or a checkpoint evaluated on the test split). Combination rules
(:data:`METHODS`):

* ``mean_prob``: the average of the members' softmax probabilities;
* ``mean_logit``: the softmax of the average logits (a geometric-mean-like rule);
* ``vote``: majority vote of the members' top-1 classes; ties go to the tied class with the
  higher average probability. Its scores are ``votes + 1e-3 * mean probability``, so top-5 and
  AUROC rank first by votes;
* ``val_weighted``: the average of probabilities weighted by a softmax of the members' validation
  log-likelihood, ``w_i = exp(-(L_i - min_j L_j) / T) / sum(...)``, where ``L_i`` is member
  ``i``'s validation cross-entropy (the mean negative log-likelihood per image, ``val/loss`` at
  its best epoch in ``metrics.jsonl``, or recomputed on the ``val`` split for a checkpoint) and
  ``T`` the temperature (:data:`DEFAULT_TEMPERATURE` = 0.1 nats): a member 0.1 nats/image worse
  on validation gets 1/e of the best member's weight. ``T -> 0`` keeps the best member alone,
  ``T -> inf`` is ``mean_prob``. Raw validation top-1, used before, put three seeds at about
  1/3 each (0.40 / 0.41 / 0.38 normalise to 0.34 / 0.34 / 0.32), so it hardly differed from
  ``mean_prob``; the log-likelihood also ranks calibrated confidence, not only the argmax.

Diversity (:func:`diversity`): pairwise disagreement (fraction of images whose top-1 classes
differ), pairwise correlation of the error indicators (1 where a member is wrong), and the
oracle accuracy (an image counts when any member is right), the ceiling of any combination.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fgclf.errors import UserError

METHODS = ("mean_prob", "mean_logit", "vote", "val_weighted")
DEFAULT_TEMPERATURE = 0.1  # nats per validation image: see val_weighted above


@dataclass
class Member:
    """One member's test predictions."""

    name: str
    logits: np.ndarray  # [N, C]
    labels: np.ndarray  # [N]
    image_ids: Optional[np.ndarray]
    class_names: list[str]
    val_top1: Optional[float] = None
    val_loss: Optional[float] = None  # validation cross-entropy (mean NLL per image) at the best epoch
    tta_flip: Optional[bool] = None  # whether the logits average the image and its mirror image
    tta: Optional[str] = None  # a multi-view test-time augmentation (fgclf.tta: five_crop, ten_crop, multiscale)

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax as _softmax

    return _softmax(logits.astype(np.float64), axis=1)


def best_val_top1(run_dir: str | Path) -> Optional[float]:
    """Validation top-1 at the run's best epoch (metrics.json ``best_epoch`` in metrics.jsonl)."""
    return best_val_metric(run_dir, "val/top1")


def best_val_metric(run_dir: str | Path, key: str) -> Optional[float]:
    """``key`` of metrics.jsonl at the run's best epoch (metrics.json ``best_epoch``; else the last)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    history = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    best = None
    if (run_dir / "metrics.json").is_file():
        best = json.loads((run_dir / "metrics.json").read_text()).get("best_epoch")
    rows = [h for h in history if h.get("epoch") == best] or history[-1:]
    value = rows[0].get(key) if rows else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _run_train_config(run_dir: str | Path) -> Optional[dict]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({err})") from err
    train = config.get("train") if isinstance(config, dict) else None
    return train if isinstance(train, dict) else None


def run_tta_flip(run_dir: str | Path) -> Optional[bool]:
    """``train.tta_flip`` of a run's config.yaml (how its predictions.npz was made); None if unknown."""
    train = _run_train_config(run_dir)
    value = train.get("tta_flip") if train is not None else None
    if value is not True and train is not None and train.get("tta") == "flip":
        value = True
    return bool(value) if isinstance(value, bool) else None


def run_tta(run_dir: str | Path) -> Optional[str]:
    """The multi-view ``train.tta`` of a run's config.yaml (``five_crop``, ``ten_crop``,
    ``multiscale``), else None (no TTA, the flip, or not known)."""
    train = _run_train_config(run_dir)
    value = train.get("tta") if train is not None else None
    return value if value in ("five_crop", "ten_crop", "multiscale") else None


def load_run_member(run_dir: str | Path, name: Optional[str] = None) -> Member:
    """A member from a finished run directory's ``predictions.npz``."""
    run_dir = Path(run_dir)
    path = run_dir / "predictions.npz"
    if not path.is_file():
        raise UserError(f"{run_dir} has no predictions.npz (not a finished train_classifier/train_probe run)")
    with np.load(path, allow_pickle=False) as npz:
        logits, labels = npz["logits"].astype(np.float64), npz["labels"].astype(np.int64)
        ids = npz["image_ids"] if "image_ids" in npz.files else None
        names = [str(c) for c in npz["class_names"]] if "class_names" in npz.files else \
            [str(i) for i in range(logits.shape[1])]
    return Member(name or run_dir.name, logits, labels, ids, names, best_val_top1(run_dir),
                  best_val_metric(run_dir, "val/loss"), run_tta_flip(run_dir), run_tta(run_dir))


def val_weights(members: Sequence[Member], temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """The ``val_weighted`` weights: softmax of ``-val_loss / temperature`` (sums to 1).

    Raises:
        UserError: a member has no validation loss, or the temperature is not positive.
    """
    if not temperature > 0:
        raise UserError(f"val_weighted: the temperature must be positive, got {temperature}")
    missing = [m.name for m in members if m.val_loss is None or not np.isfinite(m.val_loss)]
    if missing:
        raise UserError(f"val_weighted needs each member's validation loss (val/loss of metrics.jsonl); "
                        f"missing for {', '.join(missing)}")
    loss = np.asarray([m.val_loss for m in members], dtype=np.float64)
    z = np.exp(-(loss - loss.min()) / temperature)  # shifted by the minimum: no overflow, same softmax
    return z / z.sum()


def check_aligned(members: Sequence[Member]) -> None:
    """UserError unless every member scored the same images, in the same order, with the same classes."""
    if len(members) < 2:
        raise UserError("an ensemble needs at least two members")
    first = members[0]
    for m in members[1:]:
        if m.class_names != first.class_names:
            raise UserError(f"{m.name} has other classes than {first.name}")
        if m.logits.shape != first.logits.shape or not np.array_equal(m.labels, first.labels):
            raise UserError(f"{m.name} was tested on other images than {first.name} ({len(m.labels)} vs "
                            f"{len(first.labels)} labels, or another order); use runs with the same --data settings")
        if m.image_ids is not None and first.image_ids is not None and not np.array_equal(m.image_ids,
                                                                                           first.image_ids):
            raise UserError(f"{m.name} lists other test image ids than {first.name} (another split or order)")


def combine(members: Sequence[Member], method: str, *, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Ensemble scores [N, C] (row-normalised, usable as probabilities) for ``method``.

    ``temperature`` is that of ``val_weighted`` (:func:`val_weights`); other rules ignore it.
    """
    probs = np.stack([m.probs for m in members])  # [M, N, C]
    if method == "mean_prob":
        out = probs.mean(0)
    elif method == "mean_logit":
        out = softmax(np.stack([m.logits for m in members]).mean(0))
    elif method == "vote":
        votes = np.zeros(probs.shape[1:])
        for m in members:
            votes[np.arange(len(m.labels)), m.logits.argmax(1)] += 1
        out = votes + 1e-3 * probs.mean(0)
        out = out / out.sum(1, keepdims=True)
    elif method == "val_weighted":
        out = np.tensordot(val_weights(members, temperature), probs, axes=1)
    else:
        from fgclf.registry import unknown_name_message

        raise UserError(unknown_name_message("ensemble method", method, list(METHODS)))
    return out


def diversity(members: Sequence[Member]) -> dict:
    """Pairwise disagreement and error correlation matrices, and the oracle accuracy."""
    preds = np.stack([m.logits.argmax(1) for m in members])
    labels = members[0].labels
    wrong = (preds != labels).astype(np.float64)
    k = len(members)
    disagreement = np.zeros((k, k))
    corr = np.eye(k)
    for i in range(k):
        for j in range(k):
            disagreement[i, j] = float((preds[i] != preds[j]).mean())
            if i != j:
                a, b = wrong[i], wrong[j]
                corr[i, j] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    off = ~np.eye(k, dtype=bool)
    return {"names": [m.name for m in members], "disagreement": disagreement.tolist(),
            "error_correlation": corr.tolist(), "mean_disagreement": float(disagreement[off].mean()),
            "mean_error_correlation": float(np.nanmean(corr[off])) if np.isfinite(corr[off]).any() else float("nan"),
            "oracle_top1": float((wrong.min(0) == 0).mean())}


def evaluate_ensemble(members: Sequence[Member], methods: Sequence[str] = METHODS, *,
                      confidence: float = 0.95, temperature: float = DEFAULT_TEMPERATURE) -> dict:
    """Every member's metrics, their mean and interval, each ensemble's metrics, and diversity.

    ``val_weighted`` is skipped (listed in ``skipped``) when a member has no validation loss.
    """
    from fgclf.metrics import compute_metrics
    from fgclf.stats import summarize

    check_aligned(members)
    num_classes = members[0].logits.shape[1]
    labels = members[0].labels
    member_metrics = {m.name: compute_metrics(m.logits, labels, num_classes=num_classes) for m in members}
    keys = list(next(iter(member_metrics.values())))
    spread = {k: summarize([member_metrics[m.name][k] for m in members], confidence=confidence) for k in keys}
    ensembles, scores, weights = {}, {}, None
    for method in methods:
        if method == "val_weighted":
            if any(m.val_loss is None or not np.isfinite(m.val_loss) for m in members):
                continue  # reported as skipped below
            weights = dict(zip([m.name for m in members], val_weights(members, temperature).tolist()))
        scores[method] = combine(members, method, temperature=temperature)
        ensembles[method] = compute_metrics(np.log(np.clip(scores[method], 1e-12, None)), labels,
                                            num_classes=num_classes)
    skipped = [m for m in methods if m not in ensembles]
    return {"members": member_metrics, "val_top1": {m.name: m.val_top1 for m in members},
            "val_loss": {m.name: m.val_loss for m in members}, "tta_flip": {m.name: m.tta_flip for m in members},
            "tta": {m.name: m.tta for m in members},
            "val_weights": weights, "temperature": temperature, "member_summary": spread,
            "ensembles": ensembles, "skipped": skipped,
            "diversity": diversity(members), "num_samples": int(len(labels)), "num_classes": num_classes,
            "confidence": confidence, "scores": scores}


def format_report(result: dict, metrics: Sequence[str] = ("top1", "top5", "f1_macro", "auroc_macro")) -> str:
    """Markdown: members, their mean ± interval, every ensemble, and the diversity numbers."""
    pct = f"{result['confidence']:.0%}"
    def cell(value: Optional[float], fmt: str = ".4f") -> str:
        return "" if value is None else format(value, fmt)

    weights = result.get("val_weights") or {}
    tta = result.get("tta_flip") or {}
    views = result.get("tta") or {}
    lines = [f"# Ensemble of {len(result['members'])} members on {result['num_samples']} test images", "",
             "| | " + " | ".join(metrics) + " | val top1 | val loss | val weight | TTA |",
             "|---|" + "---:|" * (len(metrics) + 3) + "---|"]
    for name, m in result["members"].items():
        flip = views.get(name) or {True: "flip", False: "none"}.get(tta.get(name), "?")
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in metrics) +
                     f" | {cell(result['val_top1'].get(name))} | {cell((result.get('val_loss') or {}).get(name))} |"
                     f" {cell(weights.get(name), '.3f')} | {flip} |")
    s = result["member_summary"]
    lines.append(f"| members: mean [{pct} CI] | " + " | ".join(
        f"{s[k]['mean']:.4f} [{s[k]['ci_lo']:.4f}, {s[k]['ci_hi']:.4f}]" for k in metrics) + " | | | | |")
    for method, m in result["ensembles"].items():
        lines.append(f"| **ensemble: {method}** | " + " | ".join(f"{m[k]:.4f}" for k in metrics) + " | | | | |")
    if weights:
        lines += ["", f"val_weighted: weights = softmax(-val loss / T), T = {result['temperature']:g} nats "
                  "(a member T nats/image worse on validation gets 1/e of the best one's weight)."]
    d = result["diversity"]
    lines += ["", f"Oracle top-1 (any member right): {d['oracle_top1']:.4f}. Mean pairwise disagreement: "
              f"{d['mean_disagreement']:.4f}; mean pairwise error correlation: {d['mean_error_correlation']:.4f} "
              "(members that are good and different have high accuracy, high disagreement and low error "
              "correlation).", "", "| disagreement | " + " | ".join(d["names"]) + " |",
              "|---|" + "---:|" * len(d["names"])]
    for name, row in zip(d["names"], d["disagreement"]):
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    lines += ["", "| error correlation | " + " | ".join(d["names"]) + " |", "|---|" + "---:|" * len(d["names"])]
    for name, row in zip(d["names"], d["error_correlation"]):
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    if result["skipped"]:
        lines += ["", f"Skipped: {', '.join(result['skipped'])} (a member has no validation loss)."]
    return "\n".join(lines) + "\n"
