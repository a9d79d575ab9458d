"""GAN objectives: given discriminator outputs, return the losses (the loop stays generic).

Each objective has ``discriminator(real, fake)`` and ``generator(fake)`` on raw scores (logits)
and returns a dict whose ``"loss"`` is what to backpropagate, plus the parts worth logging
(mean scores of real and fake images; the adversarial and class parts when AC-GAN adds one).

* ``bce``: the original minimax loss with the non-saturating generator loss (Goodfellow et
  al. 2014): D minimises ``softplus(-real) + softplus(fake)``, G minimises ``softplus(-fake)``.
* ``hinge``: D ``relu(1 - real) + relu(1 + fake)``, G ``-fake`` (SNGAN / BigGAN).
* ``lsgan``: least squares (Mao et al. 2017; the lab notes' "mean squared error" GAN loss):
  D ``((real - 1)^2 + fake^2) / 2``, G ``(fake - 1)^2 / 2``.

An auxiliary classifier (AC-GAN) adds ``aux_weight * CE(aux_logits, labels)`` on real images
for D and on generated images (their conditioning labels) for G.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.nn import functional as F

from fgclf.registry import Registry

GAN_LOSSES: Registry = Registry("GAN loss")

_Pair = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


@GAN_LOSSES.register("bce")
def _bce() -> _Pair:
    return (lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
            lambda fake: F.softplus(-fake).mean())


@GAN_LOSSES.register("hinge")
def _hinge() -> _Pair:
    return (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
            lambda fake: -fake.mean())


@GAN_LOSSES.register("lsgan")
def _lsgan() -> _Pair:
    return (lambda real, fake: 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(),
            lambda fake: 0.5 * ((fake - 1) ** 2).mean())


class GANObjective:
    """Adversarial loss by name, plus the optional AC-GAN class term.

    Args:
        loss: A name from ``GAN_LOSSES`` (``bce``, ``hinge``, ``lsgan``).
        aux_weight: Weight of the auxiliary cross-entropy (used only when aux logits are given).
    """

    def __init__(self, loss: str = "hinge", *, aux_weight: float = 1.0) -> None:
        self.name = loss
        self._d, self._g = GAN_LOSSES.get(loss)()
        self.aux_weight = aux_weight

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor, *, aux_real: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        real, fake = real.float(), fake.float()
        adv = self._d(real, fake)
        out = {"d_real": real.mean().detach(), "d_fake": fake.mean().detach()}
        loss = adv
        if aux_real is not None:
            aux = F.cross_entropy(aux_real.float(), labels)
            out.update(d_adv=adv, d_aux=aux)
            loss = loss + self.aux_weight * aux
        out["loss"] = loss
        return out

    def generator(self, fake: torch.Tensor, *, aux_fake: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        adv = self._g(fake.float())
        out = {}
        loss = adv
        if aux_fake is not None:
            aux = F.cross_entropy(aux_fake.float(), labels)
            out.update(g_adv=adv, g_aux=aux)
            loss = loss + self.aux_weight * aux
        out["loss"] = loss
        return out
