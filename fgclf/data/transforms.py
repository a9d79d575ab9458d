"""Train/eval transforms resolved from the model's pretrained data config (timm's)."""
from __future__ import annotations

from typing import Callable, Optional

_AUGMENTATIONS = {
    # name -> keyword arguments for timm.data.create_transform(is_training=True, ...)
    "basic": dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=0.2),
}


def list_augmentations() -> list[str]:
    """Names accepted by ``create_transform(aug=...)`` (``none`` = eval transform)."""
    return ["none", *_AUGMENTATIONS]


def resolve_input_config(data_config: dict, image_size: Optional[int] = None) -> dict:
    """Copy of a timm data config with ``input_size`` set to ``image_size`` when given."""
    cfg = dict(data_config)
    if image_size is not None:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    return cfg


def create_transform(data_config: dict, *, is_training: bool, aug: str = "basic") -> Callable:
    """Build a torchvision transform from a timm data config.

    Args:
        data_config: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``.
        is_training: Random augmentation (``aug``) when true, resize + centre crop otherwise.
        aug: Augmentation preset (``none`` gives the eval transform for training too).
    """
    from timm.data import create_transform as timm_create_transform

    from fgclf.errors import UserError

    keys = ("input_size", "mean", "std", "crop_pct", "interpolation")
    base = {k: data_config[k] for k in keys if k in data_config}
    if not is_training or aug == "none":
        return timm_create_transform(**base, is_training=False)
    if aug not in _AUGMENTATIONS:
        raise UserError(f"unknown augmentation '{aug}'; known: {', '.join(list_augmentations())}")
    base.pop("crop_pct", None)
    return timm_create_transform(**base, is_training=True, **_AUGMENTATIONS[aug])
