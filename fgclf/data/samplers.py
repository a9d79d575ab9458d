"""Batch samplers a method can ask for (``Method.requires``).

:class:`ClassBalancedBatchSampler` makes P x K batches (API-Net's "P classes, K images each"):
every epoch each class's images are shuffled and cut into groups of K (the last group of a class
is filled up with other images of that class), the groups are shuffled, and each batch takes the
next P groups of P different classes. So an epoch uses every training image at least once (but
for the groups left over at the end, which cannot fill a batch of different classes and are
dropped like any ``drop_last`` batch), and a batch holds K images of each of P classes. The order is a function of ``(seed, epoch)`` alone: a resumed run
and any number of processes see the same global batches, and ``accelerate``'s ``split_batches``
gives each process whole groups when P is a multiple of the process count.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler

from fgclf.errors import UserError


class _Epoch:
    """Where accelerate looks for ``set_epoch`` on a wrapped batch sampler (``batch_sampler.sampler``)."""

    def __init__(self, owner: "ClassBalancedBatchSampler") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class ClassBalancedBatchSampler(BatchSampler):
    """P x K batches of dataset indices, grouped by class.

    Args:
        labels: Class of each dataset index.
        classes_per_batch: P (groups per batch).
        samples_per_class: K (images per group).
        seed: Seed of the order (with the epoch from :meth:`set_epoch`).
    """

    def __init__(self, labels: Sequence[int], *, classes_per_batch: int, samples_per_class: int, seed: int = 0) -> None:
        if samples_per_class < 2 or classes_per_batch < 2:
            raise UserError(f"P x K batches need at least 2 classes of 2 images each; got P={classes_per_batch}, "
                            f"K={samples_per_class}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.p, self.k, self.seed, self.epoch = int(classes_per_batch), int(samples_per_class), int(seed), 0
        self.batch_size, self.drop_last = self.p * self.k, True
        self.sampler = _Epoch(self)
        present = np.unique(self.labels)
        if len(present) < 2:
            raise UserError("P x K batches need at least 2 classes in the train split")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def groups(self) -> list[np.ndarray]:
        """This epoch's groups of K indices of one class each, shuffled (:meth:`batches` then puts P
        groups of P different classes into each batch)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = []
        for c in np.unique(self.labels):
            idx = rng.permutation(np.flatnonzero(self.labels == c))
            short = (-len(idx)) % self.k
            if short:  # fill the last group with images of the class's full groups (repeats only if it has < K)
                full = idx[:len(idx) - (self.k - short)]
                pool = full if len(full) >= short else idx
                idx = np.concatenate([idx, rng.choice(pool, size=short, replace=len(pool) < short)])
            groups.extend(idx.reshape(-1, self.k))
        return [groups[i] for i in rng.permutation(len(groups))]

    def batches(self) -> list[list[int]]:
        """Each batch: the next P groups (in the shuffled order) of P different classes; groups that
        cannot complete a batch any more are dropped."""
        pending, out = self.groups(), []
        while len(pending) >= self.p:
            batch, classes, rest = [], set(), []
            for group in pending:
                c = int(self.labels[group[0]])
                if len(batch) < self.p and c not in classes:
                    batch.append(group)
                    classes.add(c)
                else:
                    rest.append(group)
            if len(batch) < self.p:
                break
            out.append(np.concatenate(batch).tolist())
            pending = rest
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())
