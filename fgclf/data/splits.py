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


def kfold_mask(labels: list[int], *, num_folds: int, fold: int, seed: int) -> np.ndarray:
    """Boolean mask of fold ``fold`` (0-based) among ``num_folds`` stratified, seeded folds.

    The folds partition the items; each class is spread over the folds as evenly as
    possible (sklearn's ``StratifiedKFold`` with shuffling).
    """
    from sklearn.model_selection import StratifiedKFold

    if not 0 <= fold < num_folds:
        raise UserError(f"data.fold must be in 0..{num_folds - 1}, got {fold}")
    labels = np.asarray(labels)
    smallest = np.bincount(labels).min() if len(labels) else 0
    if num_folds < 2 or smallest < num_folds:
        raise UserError(f"{num_folds}-fold cross-validation needs >= {max(num_folds, 2)} train images per class; "
                        f"the smallest class has {smallest}")
    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    mask = np.zeros(len(labels), dtype=bool)
    mask[list(folds)[fold][1]] = True
    return mask


def _names(rec: Records, classes: list[int], detail=None, limit: int = 5) -> str:
    shown = [repr(rec.class_names[c]) + (f" ({detail(c)})" if detail else "") for c in classes[:limit]]
    return ", ".join(shown) + (f" and {len(classes) - limit} more" if len(classes) > limit else "")


def class_coverage(rec: Records) -> tuple[list[int], list[int]]:
    """``(empty, not_in_train)``: classes without any image, and classes whose images are all
    in val/test (0-based class indices, sorted)."""
    n = len(rec.class_names)
    total = np.bincount(np.asarray(rec.labels, dtype=int), minlength=n) if len(rec) else np.zeros(n, int)
    train_labels = [lab for lab, s in zip(rec.labels, rec.splits) if s == "train"]
    train = np.bincount(np.asarray(train_labels, dtype=int), minlength=n) if train_labels else np.zeros(n, int)
    empty = [c for c in range(n) if total[c] == 0]
    not_in_train = [c for c in range(n) if total[c] > 0 and train[c] == 0]
    return empty, not_in_train


def empty_classes_message(rec: Records, empty: list[int]) -> str:
    return (f"{len(empty)} of {len(rec.class_names)} classes have no images at all: {_names(rec, empty)}; a "
            "classifier cannot learn them (and they would lower every macro metric): add images or remove "
            "the class (its classes.txt line, its empty folder)")


def not_in_train_message(rec: Records, classes: list[int]) -> str:
    def detail(c: int) -> str:
        counts = {s: sum(1 for lab, sp in zip(rec.labels, rec.splits) if lab == c and sp == s) for s in ("val", "test")}
        return ", ".join(f"{k} {s}" for s, k in counts.items() if k)

    return (f"classes in val/test but not in train: {_names(rec, classes, detail)}; they cannot be learned and "
            "would make the test metrics misleading: add train images for them or remove them")


def check_class_coverage(rec: Records, *, context: str = "") -> None:
    """UserError when a class has no images at all or none in train (see :func:`class_coverage`)."""
    empty, not_in_train = class_coverage(rec)
    if empty:
        raise UserError(context + empty_classes_message(rec, empty))
    if not_in_train:
        raise UserError(context + not_in_train_message(rec, not_in_train))


def assign_splits(rec: Records, *, val_fraction: float, test_fraction: float, seed: int,
                  num_folds: int = 0, fold: int = 0, check_classes: bool = True) -> Records:
    """Return ``rec`` with every item in ``train``, ``val`` or ``test``.

    A dataset without a test split gets one (``test_fraction`` of train, stratified); one
    without a validation split gets ``val_fraction`` of the remaining train. The test split
    is drawn with ``seed`` and validation with ``seed + 1``, so they never depend on each other.
    With ``num_folds`` > 0 the validation split is fold ``fold`` of a stratified k-fold of
    train (a validation split the dataset ships is merged into train first); the test split
    stays untouched.

    With ``check_classes`` (the default) a class without images, or with val/test images but
    none in train, is a UserError naming it (:func:`check_class_coverage`).
    """
    if check_classes:
        empty, _ = class_coverage(rec)
        if empty:
            raise UserError(empty_classes_message(rec, empty))
    splits = np.array(rec.splits, dtype=object)
    if not (splits == "test").any():
        if test_fraction <= 0:
            raise UserError("the dataset has no test split; set data.test_fraction > 0")
        train = np.flatnonzero(splits == "train")
        pick = stratified_holdout([rec.labels[i] for i in train], test_fraction, seed)
        splits[train[pick]] = "test"
    if num_folds:
        splits[splits == "val"] = "train"
        train = np.flatnonzero(splits == "train")
        pick = kfold_mask([rec.labels[i] for i in train], num_folds=num_folds, fold=fold, seed=seed + 1)
        splits[train[pick]] = "val"
    elif not (splits == "val").any() and val_fraction > 0:
        train = np.flatnonzero(splits == "train")
        pick = stratified_holdout([rec.labels[i] for i in train], val_fraction, seed + 1)
        splits[train[pick]] = "val"
    out = rec.select(np.ones(len(rec), dtype=bool))
    out.splits = list(splits)
    if check_classes:
        check_class_coverage(out)
    return out


def split_summary(rec: Records) -> dict:
    """Ids per split, for the run directory (``splits.json``); with ``rec.class_ids`` (CUB layout)
    also ``class_ids``: the dataset's own class id of each label (``class_ids[label]``), so
    predictions map back to NABirds' hierarchy ids."""
    out: dict = {}
    for item_id, split in zip(rec.image_ids, rec.splits):
        out.setdefault(split, []).append(item_id)
    if rec.class_ids is not None:
        out["class_ids"] = list(rec.class_ids)
    return out
