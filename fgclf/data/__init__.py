"""Data: sources, splits, transforms and the embedded toy dataset.

``load_records`` reads any supported source into one record list with train/val/test
assigned; ``create_dataset`` wraps one split of it with a transform.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from fgclf.data.datasets import (ImageDataset, Records, find_bad_images, load_image, read_cub,
                                 read_hf, read_imagefolder, to_rgb)
from fgclf.data.splits import assign_splits, kfold_mask, split_summary, stratified_holdout
from fgclf.data.toy import TOY_DEFAULTS, default_toy_root, ensure_toy_cub, generate_toy_cub
from fgclf.data.mixup import MixupCutmix, create_mixup, tta_flip_logits
from fgclf.data.transforms import (AugmentConfig, create_transform, list_augmentations, list_auto_augment_policies,
                                   register_augmentation, resolve_augment, resolve_input_config)
from fgclf.errors import UserError

_READERS = {
    "cub": lambda root, bbox_crop: read_cub(root, bbox_crop=bbox_crop),
    "toy": lambda root, bbox_crop: read_cub(root, bbox_crop=bbox_crop),
    "imagefolder": lambda root, bbox_crop: read_imagefolder(root),
    "hf": lambda root, bbox_crop: read_hf(root),
}


def list_formats() -> list[str]:
    """Dataset formats accepted by ``load_records`` / ``create_dataset``."""
    return list(_READERS)


def load_records(*, format: str = "toy", root: Optional[str] = None, bbox_crop: bool = False,
                 val_fraction: float = 0.15, test_fraction: float = 0.2, split_seed: int = 0,
                 num_folds: int = 0, fold: int = 0, toy_params: Optional[dict] = None) -> Records:
    """Read a dataset and assign every image to ``train``, ``val`` or ``test``.

    Args:
        format: One of :func:`list_formats`.
        root: Dataset folder (HF: folder or hub name). ``toy`` generates into it (default: the
            fgclf cache) when it is missing or was made with other parameters.
        bbox_crop: Crop to ``bounding_boxes.txt`` (CUB/toy).
        val_fraction, test_fraction, split_seed, num_folds, fold: see
            :func:`fgclf.data.splits.assign_splits`.
        toy_params: Generator parameters for ``toy`` (see ``TOY_DEFAULTS``).
    """
    if format not in _READERS:
        raise UserError(f"unknown data format '{format}'; known: {', '.join(_READERS)}")
    if format == "toy":
        root = str(ensure_toy_cub(root, **(toy_params or {})))
    elif root is None:
        raise UserError(f"data.format={format} needs --data.root")
    elif format != "hf" and not Path(root).is_dir():
        raise UserError(f"dataset folder does not exist: {root}")
    rec = _READERS[format](root, bbox_crop)
    return assign_splits(rec, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed,
                         num_folds=num_folds, fold=fold)


def create_dataset(*, format: str = "toy", root: Optional[str] = None, split: str = "train",
                   transform: Optional[Callable] = None, records: Optional[Records] = None,
                   **kwargs) -> ImageDataset:
    """One split of a dataset as a torch map-style dataset of ``(image, label)``.

    Pass ``records`` (from :func:`load_records`) to reuse one parse for several splits;
    otherwise ``kwargs`` go to :func:`load_records`.
    """
    if records is None:
        records = load_records(format=format, root=root, **kwargs)
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split '{split}'; use train, val or test")
    return ImageDataset(records.split(split), transform)


__all__ = [
    "AugmentConfig", "MixupCutmix", "create_mixup", "list_auto_augment_policies", "register_augmentation",
    "resolve_augment", "tta_flip_logits", "ImageDataset", "Records", "TOY_DEFAULTS", "assign_splits", "create_dataset", "create_transform",
    "default_toy_root", "ensure_toy_cub", "find_bad_images", "generate_toy_cub", "kfold_mask", "list_augmentations",
    "list_formats", "load_image", "load_records", "read_cub", "read_hf", "read_imagefolder",
    "resolve_input_config", "split_summary", "stratified_holdout", "to_rgb",
]
