"""Seeded, stratified splits: validation from train (and test, for folders without one)."""
from __future__ import annotations

import numpy as np

from fgclf.data.datasets import Records
from fgclf.errors import UserError


def stratified_holdout(labels: list[int], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask picking about ``fraction`` of each class (at least one per class with >1).

    Deterministic from ``seed``; every class keeps at least one unpicked item.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n = len(idx)
        k = min(n - 1, max(1, int(round(fraction * n)))) if n > 1 else 0
        mask[rng.permutation(idx)[:k]] = True
    return mask


def assign_splits(rec: Records, *, val_fraction: float, test_fraction: float, seed: int) -> Records:
    """Return ``rec`` with every item in ``train``, ``val`` or ``test``.

    A dataset without a test split gets one (``test_fraction`` of train, stratified); one
    without a validation split gets ``val_fraction`` of the remaining train. The test split
    is drawn with ``seed`` and validation with ``seed + 1``, so they never depend on each other.
    """
    splits = np.array(rec.splits, dtype=object)
    if not (splits == "test").any():
        if test_fraction <= 0:
            raise UserError("the dataset has no test split; set data.test_fraction > 0")
        train = np.flatnonzero(splits == "train")
        pick = stratified_holdout([rec.labels[i] for i in train], test_fraction, seed)
        splits[train[pick]] = "test"
    if not (splits == "val").any() and val_fraction > 0:
        train = np.flatnonzero(splits == "train")
        pick = stratified_holdout([rec.labels[i] for i in train], val_fraction, seed + 1)
        splits[train[pick]] = "val"
    out = rec.select(np.ones(len(rec), dtype=bool))
    out.splits = list(splits)
    train_classes = {rec.labels[i] for i in np.flatnonzero(splits == "train")}
    unseen = sorted({rec.labels[i] for i in np.flatnonzero(splits != "train")} - train_classes)
    if unseen:
        names = ", ".join(rec.class_names[c] for c in unseen[:5])
        raise UserError(f"classes in val/test but not in train: {names}")
    return out


def split_summary(rec: Records) -> dict:
    """Ids per split, for the run directory (``splits.json``)."""
    out: dict = {}
    for item_id, split in zip(rec.image_ids, rec.splits):
        out.setdefault(split, []).append(item_id)
    return out
