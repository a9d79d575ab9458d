"""Class-conditional diffusion: DDPM training, DDIM sampling, on a ``diffusers`` UNet2DModel.

A GAN's generator maps noise to an image in one pass and learns from a discriminator's
judgement; a diffusion model learns to predict the noise added to a real image at a random
noise level (a plain MSE regression, no adversary) and generates by denoising pure noise in
many small steps. The class enters the UNet as a learned embedding added to the timestep
embedding (``num_class_embeds``), so every generated image carries its conditioning label.

Needs the ``diffusion`` extra (``pip install fgclf[diffusion]``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from fgclf.errors import UserError


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise UserError("gan.arch=diffusion needs diffusers: pip install 'fgclf[diffusion]'") from None
    return diffusers


class ClassConditionalDiffusion(nn.Module):
    """A UNet that predicts noise, with the DDPM noise schedule it was trained on.

    Args:
        image_size: Image side (a multiple of 4: the UNet halves it twice).
        num_classes: Number of classes (labels 0..num_classes-1).
        base_width: Channels of the first UNet level (then 2x, 2x).
        diffusion_steps: Number of DDPM noise levels.
        sample_steps: Default number of DDIM steps for :meth:`sample`.
    """

    def __init__(self, *, image_size: int = 32, num_classes: int, base_width: int = 64,
                 diffusion_steps: int = 1000, sample_steps: int = 50) -> None:
        super().__init__()
        diffusers = _require_diffusers()
        if image_size % 4:
            raise UserError(f"diffusion image_size must be a multiple of 4, got {image_size}")
        if base_width % 8:
            raise UserError(f"diffusion base_width must be a multiple of 8 (GroupNorm groups), got {base_width}")
        if num_classes < 1:
            raise UserError("the diffusion model is class-conditional: it needs at least one class")
        self.image_size, self.num_classes = image_size, num_classes
        self.diffusion_steps, self.sample_steps = diffusion_steps, sample_steps
        w = base_width
        self.unet = diffusers.UNet2DModel(
            sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(w, 2 * w, 2 * w), norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes)
        self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=diffusion_steps)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *, noise: Optional[torch.Tensor] = None,
             timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The DDPM objective: MSE between the added noise and the UNet's prediction of it
        (``noise`` and ``timesteps`` are drawn here unless given)."""
        noise = torch.randn_like(images) if noise is None else noise.to(images.dtype)
        t = torch.randint(0, self.diffusion_steps, (images.shape[0],), device=images.device) \
            if timesteps is None else timesteps
        noisy = self.scheduler.add_noise(images, noise, t)
        pred = self.unet(noisy, t, class_labels=labels).sample
        return F.mse_loss(pred.float(), noise.float())

    def forward(self, images: torch.Tensor, labels: torch.Tensor, *, noise: Optional[torch.Tensor] = None,
                timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.loss(images, labels, noise=noise, timesteps=timesteps)  # DDP's hooks see the training step

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, noise: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from ``noise`` [N, 3, S, S]: the same noise and labels give
        the same images. Returns images in [-1, 1]."""
        diffusers = _require_diffusers()
        sched = diffusers.DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps or self.sample_steps, device=noise.device)
        x = noise
        for t in sched.timesteps:
            eps = self.unet(x, t, class_labels=labels).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x.clamp(-1, 1)
