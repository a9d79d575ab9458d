"""Data: sources, splits, transforms and the embedded toy dataset.

``load_records`` reads any supported source into one record list with train/val/test
assigned; ``create_dataset`` wraps one split of it with a transform.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from fgclf.data.datasets import (ImageDataset, ImageInfo, Records, find_bad_images, inspect_image, load_image,
                                 read_cub, read_cub_boxes, read_hf, read_imagefolder, to_rgb)
from fgclf.data.splits import (assign_splits, check_class_coverage, class_coverage, kfold_mask, split_summary,
                               stratified_holdout)
from fgclf.data.toy import TOY_DEFAULTS, default_toy_root, ensure_toy_cub, generate_toy_cub
from fgclf.data.mixup import MixupCutmix, create_mixup, tta_flip_logits
from fgclf.data.seeds import PerSampleSeeds, sample_seed
from fgclf.data.transforms import (AugmentConfig, create_transform, list_augmentations, list_auto_augment_policies,
                                   register_augmentation, resolve_augment, resolve_input_config)
from fgclf.data import formats as _formats
from fgclf.data.formats import OFFICIAL_COUNTS, detect_format, register_format
from fgclf.errors import UserError

def list_formats() -> list[str]:
    """Dataset formats accepted by ``load_records`` / ``create_dataset`` (see :mod:`fgclf.data.formats`)."""
    return _formats.list_formats()


def load_records(*, format: str = "toy", root: Optional[str] = None, bbox_crop: bool = False,
                 val_fraction: float = 0.15, test_fraction: float = 0.2, split_seed: int = 0,
                 num_folds: int = 0, fold: int = 0, toy_params: Optional[dict] = None,
                 check_classes: bool = True, keep_missing: bool = False,
                 problems: Optional[list[str]] = None, label_level: Optional[str] = None,
                 merge_val: bool = False, levels_file: Optional[str] = None) -> Records:
    """Read a dataset and assign every image to ``train``, ``val`` or ``test``.

    Args:
        format: One of :func:`list_formats` (``auto``: detected from the files).
        root: Dataset folder (HF: folder or hub name). ``toy`` generates into it (default: the
            fgclf cache) when it is missing or was made with other parameters.
        bbox_crop: Crop to the dataset's boxes (CUB, NABirds, Cars, Aircraft, Dogs, toy).
        val_fraction, test_fraction, split_seed, num_folds, fold: see
            :func:`fgclf.data.splits.assign_splits`.
        toy_params: Generator parameters for ``toy`` (see ``TOY_DEFAULTS``).
        check_classes: Refuse classes without images or without train images (see
            :func:`fgclf.data.splits.check_class_coverage`); :mod:`fgclf.data.check` turns it
            off to list them in its report instead.
        keep_missing: Keep images a manifest lists whose file is not there (the caller treats
            them as bad images) instead of a UserError; see :func:`fgclf.data.datasets.read_cub`.
        problems: Collect the manifest problems here instead of raising at the first (the
            images of bad lines are left out); :mod:`fgclf.data.check` reports them all.
        label_level: FGVC-Aircraft's classes: ``variant`` (default), ``family``, ``manufacturer``.
        merge_val: Move the validation split a dataset ships (Aircraft, Flowers-102) into train
            (then ``val_fraction`` carves validation from the merged split; 0: none).
        levels_file: A CSV of coarser labels per class (:func:`fgclf.data.formats.read_levels_file`),
            added to the dataset's own levels (a level of the same name replaced).

    The returned records carry ``notes`` (auto's choice, a copy that differs from the official
    counts) for the caller to print.
    """
    if format not in list_formats():
        raise UserError(f"unknown data format '{format}'; known: {', '.join(list_formats())}")
    if format == "toy":
        root = str(ensure_toy_cub(root, **(toy_params or {})))
    elif root is None:
        raise UserError(f"data.format={format} needs --data.root")
    elif format != "hf" and not Path(root).is_dir():
        raise UserError(f"dataset folder does not exist: {root}")
    if label_level is not None and format not in ("fgvc_aircraft", "auto"):
        raise UserError(f"data.label_level applies to fgvc_aircraft only (the format is {format})")
    if format == "toy":
        rec = read_cub(root, bbox_crop=bbox_crop, keep_missing=keep_missing, problems=problems)
        rec.format = format
    elif format == "imagefolder":
        rec = read_imagefolder(root)
    elif format == "hf":
        rec = read_hf(root)
    else:
        rec = _formats.read_format(format, root, bbox_crop=bbox_crop, keep_missing=keep_missing, problems=problems,
                                   label_level=label_level)
    if bbox_crop and rec.bboxes is None:
        raise UserError(f"data.bbox_crop: data.format={rec.format or format} has no bounding boxes")
    if levels_file:
        rec.levels = {**(rec.levels or {}), **_formats.read_levels_file(levels_file, rec.class_names)}
    if merge_val:
        rec.splits = ["train" if s == "val" else s for s in rec.splits]
    return assign_splits(rec, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed,
                         num_folds=num_folds, fold=fold, check_classes=check_classes)


def load_records_from_config(d) -> tuple[Records, list[tuple[str, str]]]:
    """:func:`load_records` from a :class:`fgclf.config.DataConfig`, then decode-check every image.

    Returns the records (unreadable images dropped when ``d.skip_bad_images``) and the list
    of ``(path, reason)`` of the images that were dropped; without that flag the first
    unreadable image is a UserError naming it. A file a manifest lists that is not there (a
    partial copy) is a bad image too: skipped with the flag (reason ``missing file``, whatever
    ``d.verify_images``), named by the manifest reader without it. Dropping images must leave
    every class with train images, else that is a UserError too.
    """
    rec = load_records(**load_kwargs_from_config(d), keep_missing=bool(d.skip_bad_images))
    for note in rec.notes:  # auto's choice, a copy that is not the official protocol
        print(note, file=sys.stderr, flush=True)
    from fgclf.data.verified import VerifiedFiles

    # files that passed before and have not changed since are not decoded again (fgclf/data/verified.py)
    bad = find_bad_images([p for p in rec.items if isinstance(p, str)], mode=d.verify_images, record=VerifiedFiles())
    if bad and not d.skip_bad_images:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"unreadable image {path}: {why}{more}; fix it or pass --data.skip_bad_images true")
    if bad:
        bad_set = {p for p, _ in bad}
        rec = rec.select([item not in bad_set for item in rec.items])
        check_class_coverage(rec, context=f"after skipping {len(bad)} unreadable images: ")
    return rec, bad


def load_kwargs_from_config(d) -> dict:
    """The :func:`load_records` arguments of a :class:`fgclf.config.DataConfig`."""
    toy = dict(num_classes=d.toy_num_classes, train_per_class=d.toy_train_per_class,
               test_per_class=d.toy_test_per_class, image_size=d.toy_image_size, seed=d.toy_seed)
    return dict(format=d.format, root=d.root, bbox_crop=d.bbox_crop, val_fraction=d.val_fraction,
                test_fraction=d.test_fraction, split_seed=d.split_seed, num_folds=d.num_folds, fold=d.fold,
                toy_params=toy, label_level=getattr(d, "label_level", None), merge_val=getattr(d, "merge_val", False),
                levels_file=getattr(d, "levels_file", None))


def input_config_for(d, model_data_config: dict) -> dict:
    """The model's data config at the run's image size: ``d.image_size``, else (toy data) the
    generated images' own size, else the model's pretrained input size."""
    image_size = d.image_size or (d.toy_image_size if d.format == "toy" else None)
    return resolve_input_config(model_data_config, image_size)


def create_dataset(*, format: str = "toy", root: Optional[str] = None, split: str = "train",
                   transform: Optional[Callable] = None, records: Optional[Records] = None, cache=None,
                   decoder: str = "pil", **kwargs) -> ImageDataset:
    """One split of a dataset as a torch map-style dataset of ``(image, label)``.

    Pass ``records`` (from :func:`load_records`) to reuse one parse for several splits;
    otherwise ``kwargs`` go to :func:`load_records`. ``cache``: a
    :class:`fgclf.data.cache.ResizedImageCache` that image files are read through; ``decoder``:
    ``pil`` or ``torchvision`` (:mod:`fgclf.data.decode`).
    """
    if records is None:
        records = load_records(format=format, root=root, **kwargs)
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split '{split}'; use train, val or test")
    return ImageDataset(records.split(split), transform, cache=cache, decoder=decoder)


__all__ = [
    "AugmentConfig", "OFFICIAL_COUNTS", "detect_format", "register_format", "PerSampleSeeds", "sample_seed", "MixupCutmix", "create_mixup", "list_auto_augment_policies", "register_augmentation",
    "resolve_augment", "tta_flip_logits", "ImageDataset", "Records", "TOY_DEFAULTS", "assign_splits", "create_dataset", "create_transform",
    "check_class_coverage", "class_coverage", "ImageInfo", "inspect_image", "load_kwargs_from_config", "read_cub_boxes",
    "default_toy_root", "ensure_toy_cub", "find_bad_images", "generate_toy_cub", "kfold_mask", "list_augmentations",
    "input_config_for", "list_formats", "load_image", "load_records", "load_records_from_config", "read_cub", "read_hf", "read_imagefolder",
    "resolve_input_config", "split_summary", "stratified_holdout", "to_rgb",
]
