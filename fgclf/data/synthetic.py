"""Generated images as extra training data (folders written by ``scripts/generate.py``).

Synthetic images only ever join the *train* split: the validation and test splits stay the
real images they were, so every score is still a score on real data. Before any are added,
:func:`check_generator_split` verifies that the generator was trained only on images of this
run's training split; otherwise knowledge of validation/test images could leak into training
through the generated images.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from fgclf.data.datasets import Records
from fgclf.errors import UserError

MANIFEST = "manifest.jsonl"
ID_PREFIX = "synthetic/"


def load_synthetic(directory: str | Path, *, class_names: list[str]) -> Records:
    """Every image listed in ``manifest.jsonl``, as train-split records with this run's labels."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"--synthetic.dir {directory}: no {MANIFEST} (write it with scripts/generate.py)")
    items, labels, ids = [], [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rel, name = entry["file"], entry["class_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} line {n} is not a manifest entry (file, class_name, label)") from None
        if name not in class_names:
            raise UserError(f"{path} line {n}: class '{name}' is not a class of this dataset")
        file = (directory / rel).resolve()
        if directory.resolve() not in file.parents or not file.is_file():
            raise UserError(f"{path} line {n}: image {rel} not found inside {directory}")
        items.append(str(file))
        labels.append(class_names.index(name))
        ids.append(ID_PREFIX + rel)
    if not items:
        raise UserError(f"{path} lists no images")
    return Records(items, labels, ids, ["train"] * len(items), list(class_names))


def check_generator_split(directory: str | Path, records: Records) -> None:
    """UserError unless the generator behind ``directory`` trained only on this run's train images,
    and the filter classifier (if one chose the images) trained on them and validated on train or
    val images: nothing that decided what the synthetic images are may have seen a test image."""
    info_path = Path(directory) / "generator.json"
    if not info_path.is_file():
        raise UserError(f"--synthetic.dir {directory}: no generator.json, so it cannot be checked that the generator "
                        "never saw this run's validation/test images; regenerate with scripts/generate.py")
    seen = json.loads(info_path.read_text()).get("train_image_ids")
    if not seen:
        raise UserError(f"{info_path} does not list the generator's training images; regenerate with "
                        "scripts/generate.py")
    split_of = dict(zip(records.image_ids, records.splits))
    info = json.loads(info_path.read_text())
    checks = [("generator", "trained on", seen, ("train",))]
    filter_splits = info.get("classifier_splits")
    if info.get("classifier") and not filter_splits:
        raise UserError(f"{info_path}: the filter classifier's splits are not recorded; regenerate with scripts/generate.py")
    if filter_splits:  # the filter decided which images (and pseudo-labels) were kept
        checks += [("filter classifier", "trained on", filter_splits["train"], ("train",)),
                   ("filter classifier", "chose its checkpoint on", filter_splits["val"], ("train", "val"))]
    for who, did, ids, allowed in checks:
        outside = [i for i in ids if split_of.get(i) not in allowed]
        if outside:
            where = {split_of.get(i, "not in this dataset") for i in outside}
            raise UserError(f"the {who} behind {directory} {did} {len(outside)} image(s) that are not in this run's "
                            f"{'/'.join(allowed)} split ({', '.join(sorted(where))}; e.g. {outside[0]}): use the same "
                            "--data settings (format, root, val/test fractions, split seed, fold) everywhere")


def select_synthetic(synthetic: Records, *, real_train_labels: list[int], num_classes: int, ratio: float = 1.0,
                     per_class: int = 0, seed: int = 0) -> tuple[Records, dict[int, tuple[int, int]]]:
    """Pick synthetic images per class: ``per_class`` each, else ``round(ratio x real train count)``.

    Returns the chosen records and ``{class: (wanted, taken)}`` (taken < wanted when the folder
    has fewer images of that class). The choice is random with ``seed`` and sorted by position.
    """
    if per_class < 0 or ratio < 0:
        raise UserError("synthetic.per_class and synthetic.ratio must be >= 0")
    real = np.bincount(np.asarray(real_train_labels, dtype=np.int64), minlength=num_classes)
    labels = np.asarray(synthetic.labels)
    rng = np.random.default_rng(seed)
    chosen, counts = [], {}
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        wanted = per_class if per_class else int(round(ratio * real[c]))
        take = min(wanted, len(pool))
        if take:
            chosen.extend(rng.choice(pool, size=take, replace=False).tolist())
        counts[c] = (wanted, take)
    mask = np.zeros(len(synthetic), bool)
    mask[chosen] = True
    return synthetic.select(mask), counts


def add_synthetic(records: Records, synthetic: Records, *, only: bool = False) -> Records:
    """``records`` with ``synthetic`` appended to train (``only``: replacing the real train images)."""
    if only:
        records = records.select([s != "train" for s in records.splits])
    bboxes: Optional[list] = None
    if records.bboxes is not None:
        bboxes = list(records.bboxes) + [None] * len(synthetic)
    return replace(records, items=list(records.items) + list(synthetic.items),
                   labels=list(records.labels) + list(synthetic.labels),
                   image_ids=list(records.image_ids) + list(synthetic.image_ids),
                   splits=list(records.splits) + list(synthetic.splits), bboxes=bboxes)
