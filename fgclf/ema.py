"""Exponential moving average of the model's weights (``--train.ema_decay``), through timm's
``ModelEmaV3``.

The average is updated after every optimizer update (not every micro-batch) with timm's decay
schedule: with ``warmup`` the decay at update ``t`` is ``min(decay, 1 - (1 + (t - 1)) ** (-2/3))``
(the first update copies the weights), so a short fine-grained run is not dominated by the
pretrained starting point; without it the decay is ``decay`` from the second update on.
Floating-point parameters and buffers (BatchNorm statistics) are averaged, in float32 even
when the model's weights are half precision (DeepSpeed). Every process keeps the same average
(the weights it averages are the same after every update), so no communication is needed.
The average's weights are saved in ``last/`` (exact resume) and, when the validation prefers
them, as ``best``.
"""
from __future__ import annotations

import torch
from torch import nn


class ModelEma:
    """The moving average of ``model`` (the unwrapped, prepared model: on its device).

    Attributes:
        module: The averaged copy (eval mode), a model like ``model``.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        from timm.utils import ModelEmaV3

        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, dtype=torch.float32)
        for p in self._ema.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    def decay_at(self, step: int) -> float:
        """The decay applied at optimizer update ``step`` (1-based)."""
        return float(self._ema.get_decay(step))

    def update(self, model: nn.Module, step: int) -> None:
        """Average in ``model``'s weights after optimizer update ``step`` (1-based)."""
        self._ema.update(model, step=step)

    def state_dict(self) -> dict:
        return dict(self._ema.module.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self._ema.module.load_state_dict(state)


__all__ = ["ModelEma"]
