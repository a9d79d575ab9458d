"""Per-sample augmentation seeds: the draws of sample i in epoch e depend on (seed, e, i) only.

The claims, each against a reference computed by indexing the dataset in this process:
loader workers (persistent or not) and any order or sharding give the same augmented tensors;
two processes' shards of identical images get different draws (with one shared torch seed they
got the same ones); the training process's own RNG stream is left as it was.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fgclf.data import AugmentConfig, PerSampleSeeds, create_transform, sample_seed

DATA_CFG = {"input_size": (3, 24, 24), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875,
            "interpolation": "bilinear"}


class _Images(torch.utils.data.Dataset):
    """``n`` images (all the same one when ``same``), transformed by the ``basic`` preset + erasing."""

    def __init__(self, n: int, same: bool = False) -> None:
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 255, (32, 40, 3), dtype=np.uint8) for _ in range(1 if same else n)]
        self.n = n
        self.transform = create_transform(DATA_CFG, is_training=True,
                                          aug=AugmentConfig(preset="basic", random_erasing=0.5, auto_augment="rand-m9-n2"))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i % len(self.images)])), i


def _reference(ds: PerSampleSeeds, epoch: int) -> torch.Tensor:
    ds.set_epoch(epoch)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _loaded(loader, n: int) -> torch.Tensor:
    out = [None] * n
    for images, index in loader:
        for img, i in zip(images, index.tolist()):
            out[i] = img
    return torch.stack(out)


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_and_order_do_not_change_a_samples_augmentation(persistent):
    ds = PerSampleSeeds(_Images(12), seed=5)
    ref = [_reference(ds, e) for e in (0, 1)]
    assert not torch.equal(ref[0], ref[1])  # a new epoch draws anew
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                                         persistent_workers=persistent, generator=torch.Generator().manual_seed(1))
    for epoch in (0, 1):
        ds.set_epoch(epoch)  # persistent workers see it through shared memory
        assert torch.equal(_loaded(loader, len(ds)), ref[epoch]), f"epoch {epoch}"


def test_shards_of_identical_images_get_different_draws():
    """Two processes, each loading its shard (rank r: samples r, r+2, ...) of 16 copies of one image."""
    def shard(ds, rank):
        return torch.stack([ds[i][0] for i in range(rank, len(ds), 2)])

    seeded = PerSampleSeeds(_Images(16, same=True), seed=5)
    a, b = shard(seeded, 0), shard(seeded, 1)
    assert all(not torch.equal(x, y) for x, y in zip(a, b))  # the k-th samples of the two processes differ

    plain = _Images(16, same=True)  # what every process did before: torch.manual_seed(seed), then draw in turn
    torch.manual_seed(5)
    a = shard(plain, 0)
    torch.manual_seed(5)
    b = shard(plain, 1)
    assert torch.equal(a, b)  # the defect: identical crops, flips and erasing boxes on every process


def test_the_training_process_stream_is_left_alone():
    import random

    ds = PerSampleSeeds(_Images(3), seed=1)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ds[0], ds[2]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in range(3) for i in range(200)}
    assert len(seeds) == 2 * 3 * 200 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(7, 2, 11) == sample_seed(7, 2, 11)


def test_wrapped_dataset_attributes_and_pickling():
    import pickle

    ds = PerSampleSeeds(_Images(4), seed=3)
    ds.set_epoch(2)
    assert ds.n == 4 and len(ds) == 4
    again = pickle.loads(pickle.dumps(ds))
    assert again.epoch == 2 and torch.equal(again[1][0], ds[1][0])
