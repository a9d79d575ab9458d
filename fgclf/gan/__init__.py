"""Generative models for synthetic training images: DCGAN, class-conditional DCGAN, diffusion.

Kept apart as network (``models``: generator, discriminator; ``diffusion``: UNet + noise
schedule), objective (``objectives``: losses from discriminator outputs) and I/O
(``io``: build, export, load, sample); ``scripts/train_gan.py`` holds the generic loop.
"""
from fgclf.gan.io import (build_models, gan_spec, generate_images, grid_labels, is_conditional, load_generator,
                          read_generator_config, resolve_generator_dir, sample_noise, save_generator, save_grid,
                          to_uint8)
from fgclf.gan.models import DCGANDiscriminator, DCGANGenerator, check_image_size
from fgclf.gan.objectives import GAN_LOSSES, GANObjective

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "GANObjective", "GAN_LOSSES", "build_models", "check_image_size",
           "gan_spec", "generate_images", "grid_labels", "is_conditional", "load_generator", "read_generator_config",
           "resolve_generator_dir", "sample_noise", "save_generator", "save_grid", "to_uint8"]
