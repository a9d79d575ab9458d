"""Batch-level augmentation on the device: mixup / cutmix for training, flip TTA for evaluation.

Both act on a collated batch ``(N, C, H, W)`` (after the per-image transform), so they run
wherever the batch is -- on the accelerator in the training loop.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from fgclf.data.transforms import torch_seeded_rng
from fgclf.errors import UserError


class MixupCutmix(Mixup):
    """timm's :class:`~timm.data.Mixup` in ``batch`` mode: one ``lam`` per batch.

    Call with ``(images, labels)`` (labels: class indices ``(N,)``); returns ``(images,
    soft_targets)`` with ``soft_targets`` of shape ``(N, num_classes)`` summing to 1:
    ``lam * onehot(labels) + (1 - lam) * onehot(labels.flip(0))`` (label-smoothed when asked).
    ``images`` are mixed in place with ``images.flip(0)`` (as timm does). ``last_lam`` holds the
    ``lam`` of the last call (1.0 when the batch was left unmixed, cutmix: box-corrected).

    Odd batches: timm asserts an even batch size because its ``pair``/``elem`` modes pair the
    elements; batch mode pairs element ``i`` with ``N-1-i``, so in an odd batch the middle
    element is mixed with itself and keeps its own image and (smoothed) one-hot target. So an odd
    last batch needs neither ``drop_last`` nor special handling.

    Random draws (timm's use numpy) follow ``torch.manual_seed``.
    """

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
                 label_smoothing: float, num_classes: int) -> None:
        super().__init__(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                         switch_prob=switch_prob, mode="batch", label_smoothing=label_smoothing,
                         num_classes=num_classes)
        self.last_lam = 1.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm's __call__ minus its even-batch assert, which batch mode does not need (see above)
        with torch_seeded_rng():
            lam = self._mix_batch(images)
        self.last_lam = float(lam)
        return images, mixup_target(labels, self.num_classes, lam, self.label_smoothing)


def create_mixup(*, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0,
                 num_classes: int) -> Optional[MixupCutmix]:
    """Mixup / cutmix for a training batch, or ``None`` when both alphas are 0.

    Train on the soft targets with ``torch.nn.functional.cross_entropy(logits, soft_targets)``
    (probability targets) or timm's ``SoftTargetCrossEntropy``; apply label smoothing here, not
    in the loss as well.

    Args:
        mixup_alpha: Beta(alpha, alpha) parameter of the mixup ratio; 0 = no mixup.
        cutmix_alpha: Beta(alpha, alpha) parameter of the cutmix box area; 0 = no cutmix.
        prob: Probability that a batch is mixed at all.
        switch_prob: With both alphas > 0, probability of cutmix instead of mixup for a batch.
        label_smoothing: Smoothing of the one-hot targets before mixing.
        num_classes: Number of classes (width of the soft targets).
    """
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise UserError(f"{name}={value}: must be >= 0 (0 = off)")
    for name, value in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"mixup {name}={value}: must be in [0, 1]")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    if int(num_classes) < 2:
        raise UserError(f"mixup needs num_classes >= 2 (got {num_classes})")
    return MixupCutmix(mixup_alpha=float(mixup_alpha), cutmix_alpha=float(cutmix_alpha), prob=float(prob),
                       switch_prob=float(switch_prob), label_smoothing=float(label_smoothing),
                       num_classes=int(num_classes))


def tta_flip_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Mean of the logits of ``images`` and of their horizontal flip (test-time augmentation).

    Two forward passes (no doubled batch, so peak memory stays that of plain evaluation); the
    caller chooses ``model.eval()`` / ``torch.no_grad()``. A model whose output is invariant to
    a horizontal flip gets exactly its plain logits back.

    Args:
        model: Maps a batch ``(N, C, H, W)`` to logits ``(N, num_classes)``.
        images: Batch of images, width last.
    """
    return (model(images) + model(images.flip(-1))) / 2
