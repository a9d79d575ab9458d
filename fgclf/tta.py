"""Test-time augmentation (``--train.tta``): the prediction averaged over views of each image.

* ``flip``: the image and its mirror image, logits averaged (``--train.tta_flip``, as before);
* ``five_crop``: four corner crops and the centre crop, each ``crop_frac`` (0.875) of the
  evaluated image's side, resized back to the input size;
* ``ten_crop``: the five crops and their mirror images;
* ``multiscale``: centre crops of 1.0, 0.875 and 0.75 of the side (the image seen at three zooms),
  resized back to the input size, each with its mirror image.

The crops are taken from the image as evaluation presents it (resized and centre-cropped by the
eval transform), so a model that needs a fixed input size takes every view. The multi-view modes
average the views' softmax probabilities and return their logarithm (a softmax of it gives the
averaged probabilities back), as multi-crop testing in the fine-grained papers does (e.g. CAL's
flipped multi-crop test). Every view is one forward pass: the evaluation costs ``num_views(mode)``
times a plain one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "flip", "five_crop", "ten_crop", "multiscale")
CROP_FRAC = 0.875
ZOOMS = (1.0, 0.875, 0.75)


def num_views(mode: str) -> int:
    return {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10, "multiscale": 2 * len(ZOOMS)}[mode]


def _crop(images: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    size = tuple(images.shape[-2:])
    crop = images[..., top:top + h, left:left + w]
    if crop.shape[-2:] == size:
        return crop
    return F.interpolate(crop.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(images.dtype)


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a batch ``(N, C, H, W)`` for ``mode``, each at ``H x W`` (see the module doc)."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; known: {', '.join(TTA_MODES)}")
    H, W = images.shape[-2:]
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, images.flip(-1)]
    if mode in ("five_crop", "ten_crop"):
        h, w = round(CROP_FRAC * H), round(CROP_FRAC * W)
        out = [_crop(images, t, l, h, w) for t, l in ((0, 0), (0, W - w), (H - h, 0), (H - h, W - w),
                                                      ((H - h) // 2, (W - w) // 2))]
        return out + [v.flip(-1) for v in out] if mode == "ten_crop" else out
    out = []
    for zoom in ZOOMS:
        h, w = round(zoom * H), round(zoom * W)
        v = _crop(images, (H - h) // 2, (W - w) // 2, h, w)
        out += [v, v.flip(-1)]
    return out


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """The prediction of ``model`` over the views of ``images``: for ``flip`` the mean logits, for the
    multi-view modes the log of the mean softmax probabilities (one forward pass per view, so peak
    memory stays that of plain evaluation)."""
    if mode == "none":
        return model(images)
    if mode == "flip":
        from fgclf.data.mixup import tta_flip_logits

        return tta_flip_logits(model, images)
    total = None
    all_views = views(images, mode)
    for v in all_views:
        p = model(v).float().softmax(dim=1)
        total = p if total is None else total + p
    return (total / len(all_views)).clamp_min(1e-12).log()


__all__ = ["TTA_MODES", "num_views", "tta_logits", "views"]
