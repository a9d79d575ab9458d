"""Pictures a method writes into its run directory (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path

import torch


def _displayable(image: torch.Tensor):
    """A normalised CHW tensor as an HWC array in [0, 1] (per-image min-max: the mean/std are not known here)."""
    x = image.float()
    x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-8)
    return x.permute(1, 2, 0).numpy()


def attention_grid(images: torch.Tensor, maps: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor, path: Path, *,
                   title: str) -> None:
    """Rows: the image with its crop box, the attention map over it, the crop the model also sees.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, H, W)`` attention upsampled to the image.
        boxes: ``(B, 4)`` ``(y0, y1, x0, x1)`` crop boxes (end exclusive).
        crops: ``(B, 3, H, W)`` the crops.
        path: PNG to write (its folder is created); written to a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    for i in range(n):
        img = _displayable(images[i])
        y0, y1, x0, x1 = boxes[i].tolist()
        axes[0, i].imshow(img)
        axes[0, i].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.5))
        axes[1, i].imshow(img)
        axes[1, i].imshow(maps[i].numpy(), cmap="jet", alpha=0.5)
        axes[2, i].imshow(_displayable(crops[i]))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(("image + crop box", "mean attention", "crop")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def part_grid(images: torch.Tensor, boxes: list, path: Path, *, title: str) -> None:
    """Each image with rectangles on its selected parts: ``boxes[i]`` lists ``(y, x, size)`` squares or
    ``(y, x, height, width)`` rectangles in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = images.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(_displayable(images[i]))
        for box in boxes[i]:
            y, x, height, width = box if len(box) == 4 else (*box, box[2])
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), width, height, fill=False, color="yellow", lw=1.0))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Write a figure to ``path`` through a temporary name (its folder is created)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
