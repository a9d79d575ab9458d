"""Classification losses by name: ``create_loss(name, **kwargs)`` over a registry."""
from __future__ import annotations

import torch
from torch import nn

from fgclf.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


@LOSSES.register("ce")
def _cross_entropy(*, label_smoothing: float = 0.0, **_: object) -> nn.Module:
    """Cross-entropy on integer labels, with optional label smoothing."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def list_losses() -> list[str]:
    """Registered loss names."""
    return LOSSES.names()


def create_loss(name: str = "ce", **kwargs: object) -> nn.Module:
    """Build the loss ``name`` (unknown names raise a UserError with suggestions)."""
    return LOSSES.get(name)(**kwargs)


