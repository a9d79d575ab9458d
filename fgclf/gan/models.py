"""DCGAN generator and discriminator, unconditional or class-conditional.

``DCGANGenerator`` (Radford et al. 2016): the latent (plus, when conditional, a learned class
embedding) is projected to 4x4 by a transposed convolution, then doubled by transposed
convolutions with BatchNorm + ReLU up to ``image_size``, tanh output in [-1, 1].

``DCGANDiscriminator``: strided 4x4 convolutions with LeakyReLU down to 4x4. Spectral norm
(Miyato et al. 2018) instead of BatchNorm keeps real and fake images independent inside one
batch, so one forward pass can score both (one forward per backward, which DDP wants). The
features are sum-pooled into ``h``; the score is ``linear(h)``, plus for class conditioning
either the projection term ``<embed(y), h>`` (``conditioning="projection"``, Miyato & Koyama
2018) or a separate class head trained with cross-entropy (``conditioning="acgan"``, Odena
et al. 2017), returned as ``aux`` logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from fgclf.errors import UserError


def check_image_size(image_size: int) -> int:
    """DCGAN sizes are powers of two from 16 up; anything else is a UserError."""
    if image_size < 16 or image_size & (image_size - 1):
        raise UserError(f"GAN image_size must be a power of two >= 16 (16, 32, 64, ...), got {image_size}")
    return int(math.log2(image_size)) - 2  # doublings after the 4x4 start


def _widths(n: int, base_width: int, max_width: int) -> list[int]:
    """Channel widths from 4x4 outwards: wide at low resolution, ``base_width`` at the largest."""
    return [min(base_width * 2 ** (n - 1 - i), max_width) for i in range(n)]


class DCGANGenerator(nn.Module):
    """z [N, latent_dim] (+ labels [N]) -> images [N, channels, image_size, image_size] in [-1, 1].

    Args:
        image_size: Output side, a power of two >= 16.
        latent_dim: Size of the noise vector (the lab notes' ``encoding_dims``, 100).
        num_classes: 0 for an unconditional generator; else the class embedding table size.
        base_width: Channels of the last hidden layer (doubling towards 4x4).
        max_width: Cap on the channels at low resolution.
        embed_dim: Size of the class embedding concatenated to z (default: latent_dim).
        channels: Image channels.
    """

    def __init__(self, *, image_size: int = 32, latent_dim: int = 100, num_classes: int = 0, base_width: int = 64,
                 max_width: int = 512, embed_dim: Optional[int] = None, channels: int = 3) -> None:
        super().__init__()
        n = check_image_size(image_size)
        self.image_size, self.latent_dim, self.num_classes = image_size, latent_dim, num_classes
        embed_dim = embed_dim or latent_dim
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        widths = _widths(n, base_width, max_width)
        in_dim = latent_dim + (embed_dim if num_classes else 0)
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional generator needs labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """images [N, C, S, S] (+ labels) -> (score [N], aux class logits [N, K] or None).

    Args:
        image_size: Input side, a power of two >= 16.
        num_classes: 0 for unconditional; else the number of classes.
        conditioning: ``projection`` or ``acgan`` (only with ``num_classes > 0``).
        base_width: Channels of the first (highest-resolution) layer.
        max_width: Cap on the channels.
        channels: Image channels.
    """

    def __init__(self, *, image_size: int = 32, num_classes: int = 0, conditioning: str = "projection",
                 base_width: int = 64, max_width: int = 512, channels: int = 3) -> None:
        super().__init__()
        n = check_image_size(image_size)
        if conditioning not in ("projection", "acgan"):
            raise UserError(f"unknown GAN conditioning '{conditioning}'; known: projection, acgan")
        self.num_classes, self.conditioning = num_classes, conditioning
        widths = list(reversed(_widths(n, base_width, max_width)))  # high resolution first
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, widths[0], 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [spectral_norm(nn.Conv2d(a, b, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        self.net = nn.Sequential(*layers)  # -> [N, widths[-1], 4, 4]
        width = widths[-1]
        self.score = spectral_norm(nn.Linear(width, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, width)) if num_classes and conditioning == "projection" \
            else None
        self.aux = nn.Linear(width, num_classes) if num_classes and conditioning == "acgan" else None

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = self.net(images).sum(dim=(2, 3))
        out = self.score(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a projection discriminator needs labels")
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out, (self.aux(h) if self.aux is not None else None)


def _dcgan_init(m: nn.Module) -> None:
    """DCGAN's init: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
