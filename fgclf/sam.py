"""Sharpness-Aware Minimization (``--train.sam_rho``): Foret, Kleiner, Mobahi and Neyshabur, ICLR 2021;
adaptive SAM (``--train.sam_adaptive``): Kwon, Kim, Park and Choi, ICML 2021. Written after the
reference implementation davda54/sam (``sam.py``: ``first_step``, ``second_step``, ``_grad_norm``).

One update takes two gradients:

1. ``g = grad L(w)`` over the update's micro-batches (all-reduced over processes, so every process
   perturbs alike);
2. ``e = rho * g / ||g||`` (adaptive: ``e = rho * w^2 g / ||w g||``, elementwise ``w``), and the
   weights move to ``w + e``;
3. ``g' = grad L(w + e)`` over the same micro-batches, with the same random draws (mixup,
   augmentation inside the step, dropout: the RNG states of step 1 are replayed) and without
   updating BatchNorm's running statistics a second time;
4. the weights go back to ``w`` and the optimizer steps with ``g'`` (clipping applies to ``g'``).

With fp16 loss scaling the gradients are scaled, but ``e`` does not depend on their scale (it is
normalised), so nothing is unscaled early; when ``g`` is not finite the perturbation is skipped
(the scaler then skips the step). Every update costs two forward and backward passes.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterable

import numpy as np
import torch
from torch import nn


class SAM:
    """The perturbation of SAM / ASAM on a model's trainable parameters.

    Args:
        params: The parameters the optimizer updates.
        rho: Radius of the neighbourhood (Foret et al.: 0.05; ASAM: 0.5 to 2.0).
        adaptive: ASAM's scale-invariant neighbourhood.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, rho: float, adaptive: bool = False) -> None:
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.adaptive = rho, adaptive
        self._offsets: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def perturb(self) -> bool:
        """Move the weights to ``w + e`` from their current gradients; False (nothing moved) when the
        gradient norm is zero or not finite."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return False
        scaled = [((p.abs() if self.adaptive else 1.0) * p.grad).float().norm(2) for p in with_grad]
        norm = torch.stack(scaled).norm(2)
        if not torch.isfinite(norm) or norm == 0:
            return False
        scale = self.rho / (norm + 1e-12)
        self._offsets = []
        for p in with_grad:
            e = ((p.float() ** 2 if self.adaptive else 1.0) * p.grad.float() * scale).to(p.dtype)
            p.add_(e)
            self._offsets.append((p, e))
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Move the weights back to ``w`` (after the second gradient)."""
        for p, e in self._offsets:
            p.sub_(e)
        self._offsets = []


def rng_state() -> tuple:
    """Every random stream a training step may draw from: torch (CPU and CUDA), numpy, Python."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def set_rng_state(state: tuple) -> None:
    cpu, cuda, numpy_state, python_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


@contextmanager
def frozen_running_stats(model: nn.Module):
    """BatchNorm layers normalise with the batch, and their running statistics are put back as they
    were afterwards (a copy restored, not a zero momentum: an overflowing fp16 pass would otherwise
    leave 0 * inf = nan in them)."""
    saved = [(b, b.detach().clone()) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


__all__ = ["SAM", "frozen_running_stats", "rng_state", "set_rng_state"]
