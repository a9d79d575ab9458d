"""Per-sample augmentation seeds: sample ``i`` of epoch ``e`` is augmented from ``(seed, e, i)``.

A DataLoader worker draws every augmentation from its own RNG stream, seeded from the
training process's RNG when the epoch's iterator starts. That makes a sample's crop, flip and
erasing box depend on which process and which worker loads it and on how many batches came
before: with the same seed on every DDP process, the k-th sample of every process got the same
draws; and a run resumed in the middle of an epoch (skipping the batches already done) could not
draw what the uninterrupted run drew.

:class:`PerSampleSeeds` wraps the training dataset so that the RNGs (torch's CPU generator,
``random`` and ``numpy``) are seeded from ``(seed, epoch, index)`` for each sample and restored
afterwards. The augmentation of a sample then depends only on the run's seed, the epoch and the
sample, whatever the number of processes, workers or a resume: different processes get different
samples and so different draws, and a resumed run redraws exactly. Dropout, drop-path and
mixup run in the training process on its own per-process stream (``fgclf.runtime.seed_per_process``).

The epoch lives in a shared-memory tensor, so persistent workers (created once) see
:meth:`PerSampleSeeds.set_epoch` too.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, index)`` (numpy's SeedSequence: no overlaps between nearby triples)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0]) >> 1


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and ``numpy`` inside the block; restore all three after.

    Only the CPU generator is touched (``torch.manual_seed`` would also reseed CUDA generators):
    augmentation runs on the CPU, and the training process's own stream must continue unchanged
    when samples are loaded in it (``num_workers 0``).
    """
    cpu = torch.random.default_generator
    torch_state, py_state, np_state = cpu.get_state(), random.getstate(), np.random.get_state()
    cpu.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        cpu.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class PerSampleSeeds(torch.utils.data.Dataset):
    """``dataset[index]`` drawn under :func:`seeded_rngs` of :func:`sample_seed` ``(seed, epoch, index)``.

    Other attributes (``records``, ``targets``, ``class_names``) are the wrapped dataset's.

    Args:
        dataset: A map-style dataset whose transform draws from torch/random/numpy.
        seed: The run's seed.
    """

    def __init__(self, dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # read by persistent workers too

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws the following ``__getitem__`` calls make (``fit`` sets it); a transform
        that changes with the epoch (progressive resizing) is told too."""
        self._epoch.fill_(int(epoch))
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_epoch"):
            transform.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded_rngs(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str):
        if name in ("dataset", "seed", "_epoch"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
