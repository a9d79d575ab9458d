"""Progressive resizing (``--data.progressive "0:224,10:336,20:448"``): the training crop size grows
with the epoch, as in the fast ImageNet recipes (fast.ai's DAWNBench entry; FixRes, Touvron et al.
2019, on why the final size matters) and FixRes-style fine-grained schedules that end at 448 px.

:class:`ScheduledTransform` holds one train transform per size and applies the one of the current
epoch. The epoch is a shared-memory tensor that :class:`fgclf.data.PerSampleSeeds` sets with its
own (``fit`` sets it before each epoch), so loader workers, persistent or not, switch with it,
and a run resumed in any epoch crops at that epoch's size. Validation and test stay at
``data.image_size`` (the size the model is for). The batch size does not change.
"""
from __future__ import annotations

from typing import Callable

import torch

from fgclf.errors import UserError


def parse_progressive(spec: str) -> list[tuple[int, int]]:
    """``"0:224,10:336"`` as ``[(0, 224), (10, 336)]``: from epoch 0 (0-based), epochs increasing."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        epoch, _, size = part.partition(":")
        if not epoch.strip().isdigit() or not size.strip().isdigit() or int(size) < 8:
            raise UserError(f"data.progressive: bad entry {part!r}; expected EPOCH:SIZE, e.g. \"0:224,10:336,20:448\"")
        out.append((int(epoch), int(size)))
    if not out or out[0][0] != 0:
        raise UserError("data.progressive must start at epoch 0 (e.g. \"0:224,...\")")
    if any(b[0] <= a[0] for a, b in zip(out, out[1:])):
        raise UserError(f"data.progressive: epochs must increase ({spec})")
    return out


class ScheduledTransform:
    """The transform of the current epoch's size (see the module doc)."""

    def __init__(self, schedule: list[tuple[int, int]], make: Callable[[int], Callable]) -> None:
        self.schedule = schedule
        self.transforms = {size: make(size) for _, size in schedule}
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def size(self, epoch: int) -> int:
        return next(size for start, size in reversed(self.schedule) if epoch >= start)

    def __call__(self, image):
        return self.transforms[self.size(int(self._epoch))](image)


__all__ = ["ScheduledTransform", "parse_progressive"]
