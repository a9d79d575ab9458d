"""Building, exporting, loading and sampling generators (GAN or diffusion).

An export directory (``checkpoints/generator`` of a ``train_gan.py`` run)::

    generator.safetensors      weights that generate.py uses (the EMA generator when enabled)
    discriminator.safetensors  the discriminator (GANs only)
    config.json                arch + its settings, class names, data settings, epoch, seed

:func:`load_generator` rebuilds the generator from config.json alone.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fgclf.errors import UserError

GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
CONFIG_FILE = "config.json"
ARCHS = ("cdcgan", "dcgan", "diffusion")


def gan_spec(cfg: Any, num_classes: int) -> dict:
    """The architecture settings that rebuild a model (stored in config.json)."""
    spec = {"arch": cfg.arch, "image_size": cfg.image_size, "base_width": cfg.base_width,
            "num_classes": 0 if cfg.arch == "dcgan" else num_classes}
    if cfg.arch == "diffusion":
        spec.update(diffusion_steps=cfg.diffusion_steps, sample_steps=cfg.sample_steps)
    else:
        spec.update(latent_dim=cfg.latent_dim, conditioning=cfg.conditioning)
    return spec


def build_models(spec: dict) -> tuple[nn.Module, Optional[nn.Module]]:
    """(generator, discriminator) for a spec from :func:`gan_spec`; diffusion has no discriminator."""
    from fgclf.gan.models import DCGANDiscriminator, DCGANGenerator

    arch = spec["arch"]
    if arch == "diffusion":
        from fgclf.gan.diffusion import ClassConditionalDiffusion

        return ClassConditionalDiffusion(image_size=spec["image_size"], num_classes=spec["num_classes"],
                                         base_width=spec["base_width"], diffusion_steps=spec["diffusion_steps"],
                                         sample_steps=spec["sample_steps"]), None
    if arch not in ARCHS:
        raise UserError(f"unknown generative model '{arch}'; known: {', '.join(ARCHS)}")
    g = DCGANGenerator(image_size=spec["image_size"], latent_dim=spec["latent_dim"], num_classes=spec["num_classes"],
                       base_width=spec["base_width"])
    d = DCGANDiscriminator(image_size=spec["image_size"], num_classes=spec["num_classes"],
                           conditioning=spec["conditioning"], base_width=spec["base_width"])
    return g, d


def is_conditional(spec: dict) -> bool:
    return spec["num_classes"] > 0


def sample_noise(spec: dict, n: int, *, seed: int) -> torch.Tensor:
    """The input noise for ``n`` samples, drawn on the CPU from ``seed`` (the same on any device)."""
    g = torch.Generator().manual_seed(int(seed))
    if spec["arch"] == "diffusion":
        return torch.randn(n, 3, spec["image_size"], spec["image_size"], generator=g)
    return torch.randn(n, spec["latent_dim"], generator=g)


@torch.no_grad()
def generate_images(generator: nn.Module, spec: dict, noise: torch.Tensor, labels: Optional[torch.Tensor], *,
                    batch_size: int = 256, steps: Optional[int] = None) -> torch.Tensor:
    """Images in [-1, 1] on the CPU for ``noise`` (and ``labels``), in eval mode, batch by batch."""
    param = next(generator.parameters())
    was_training = generator.training
    generator.eval()
    out = []
    try:
        for start in range(0, noise.shape[0], batch_size):
            z = noise[start:start + batch_size].to(param.device)
            y = labels[start:start + batch_size].to(param.device) if labels is not None else None
            if spec["arch"] == "diffusion":
                x = generator.sample(y, noise=z, steps=steps)
            else:
                x = generator(z, y)
            out.append(x.float().cpu())
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, spec["image_size"], spec["image_size"])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (N, C, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_labels(num_classes: int, per_class: int, max_classes: int) -> Optional[torch.Tensor]:
    """Row-major labels of a sample grid: one row per class (None for an unconditional model)."""
    if num_classes == 0:
        return None
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)


def save_grid(images: torch.Tensor, path: str | os.PathLike, *, per_row: int) -> None:
    """A PNG grid of [-1, 1] images, ``per_row`` images per row (one class per row)."""
    from torchvision.utils import save_image

    from fgclf.utils import atomic_write_bytes
    import io

    buf = io.BytesIO()
    save_image((images.clamp(-1, 1) + 1) / 2, buf, format="png", nrow=per_row, padding=2)
    atomic_write_bytes(path, buf.getvalue())


def save_generator(directory: str | os.PathLike, generator: nn.Module, discriminator: Optional[nn.Module], *,
                   spec: dict, class_names: list[str], extra: Optional[dict] = None) -> Path:
    """Write an export directory (under a temporary name, renamed when complete)."""
    from safetensors.torch import save_file

    from fgclf.utils import atomic_write_json, replace_dir

    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def plain(module: nn.Module) -> dict:
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    save_file(plain(generator), str(tmp / GENERATOR_FILE))
    if discriminator is not None:
        save_file(plain(discriminator), str(tmp / DISCRIMINATOR_FILE))
    atomic_write_json(tmp / CONFIG_FILE, {"format": "fgclf.generator/1", "spec": spec, "class_names": class_names,
                                          **(extra or {})})
    replace_dir(tmp, directory)
    return directory


def read_generator_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"not a generator export (no {CONFIG_FILE}): {directory}; pass a train_gan.py run's "
                        "checkpoints/generator folder or its run directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != "fgclf.generator/1":
        raise UserError(f"{path} is not a generator export (format {meta.get('format')!r})")
    return meta


def resolve_generator_dir(path: str | os.PathLike) -> Path:
    """A run directory or an export directory -> the export directory."""
    path = Path(path)
    if (path / "checkpoints" / "generator" / CONFIG_FILE).is_file():
        return path / "checkpoints" / "generator"
    if not path.exists():
        raise UserError(f"generator checkpoint not found: {path}")
    return path


def load_generator(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   discriminator: bool = False) -> tuple[nn.Module, dict] | tuple[nn.Module, nn.Module, dict]:
    """Rebuild the exported generator (eval mode) from a run or export directory.

    Returns ``(generator, meta)``, or ``(generator, discriminator, meta)`` with ``discriminator=True``.
    """
    from safetensors.torch import load_file

    directory = resolve_generator_dir(path)
    meta = read_generator_config(directory)
    g, d = build_models(meta["spec"])
    g.load_state_dict(load_file(str(directory / GENERATOR_FILE)), strict=True)
    g.to(device).eval()
    if not discriminator:
        return g, meta
    if d is None or not (directory / DISCRIMINATOR_FILE).is_file():
        raise UserError(f"{directory} has no discriminator")
    d.load_state_dict(load_file(str(directory / DISCRIMINATOR_FILE)), strict=True)
    return g, d.to(device).eval(), meta
