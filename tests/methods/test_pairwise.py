"""API-Net: partners are the hand-computed nearest neighbours, the gates follow the paper's formulas,
and P x K batches are whole groups of distinct classes, the same for any process count."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from fgclf.data.samplers import ClassBalancedBatchSampler
from fgclf.methods import StepContext, create_method
from fgclf.methods.pairwise import select_partners


def test_partners_are_the_nearest_same_class_and_other_class_images():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(10, 6, generator=g), torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3, 2])
    intra, inter = select_partners(f, y, f, y, 0)
    d = np.linalg.norm(f.numpy()[:, None] - f.numpy()[None], axis=2)
    for i in range(10):
        same = [j for j in range(10) if y[j] == y[i] and j != i]
        other = [j for j in range(10) if y[j] != y[i]]
        assert intra[i] == (min(same, key=lambda j: d[i, j]) if same else i)  # class 3 has one image: itself
        assert inter[i] == min(other, key=lambda j: d[i, j])
    # a process's rows against the global batch: the same partners, indices into the global batch
    intra2, inter2 = select_partners(f[5:], y[5:], f, y, 5)
    assert torch.equal(intra2, intra[5:]) and torch.equal(inter2, inter[5:])


def test_interaction_gates_follow_the_paper():
    torch.manual_seed(0)
    model = create_method("api_net", hidden=8, dropout=0.0).build(timm.create_model("resnet18", num_classes=3), 3)
    x1, x2 = torch.randn(4, model.num_features), torch.randn(4, model.num_features)
    mutual = model.fg_map2(model.fg_map1(torch.cat([x1, x2], 1)))
    g1, g2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
    expected = [model.fg_head(v) for v in (x1 + g1 * x1, x1 + g2 * x1, x2 + g2 * x2, x2 + g1 * x2)]
    for got, want in zip(model.interact(x1, x2), expected):
        torch.testing.assert_close(got, want)


def test_training_step_ranks_self_over_other_and_predicts_plainly():
    torch.manual_seed(0)
    method = create_method("api_net", hidden=8)
    model = method.build(timm.create_model("resnet18", num_classes=3), 3)
    x, y = torch.randn(8, 3, 64, 64), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    out = method.training_step(model.train(), (x, y), StepContext())
    torch.testing.assert_close(out.loss.detach(), out.terms["ce"] + out.terms["rank"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fg_head(model.forward_head(model.forward_features(x), pre_logits=True)))


def test_pk_batches_hold_whole_groups_of_distinct_classes_and_cover_every_class():
    labels = [c for c in range(6) for _ in range(3 + c)]  # 3..8 images per class
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=2, seed=1)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert batches and len(batches) == len(sampler)
    for batch in batches:
        classes = [labels[i] for i in batch]
        groups = [classes[i:i + 2] for i in range(0, 8, 2)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4
        # split over 2 processes (accelerate's split_batches): each gets 2 whole groups
        for half in (batch[:4], batch[4:]):
            assert all(labels[half[i]] == labels[half[i + 1]] for i in (0, 2))
    assert {labels[i] for b in batches for i in b} == set(range(6))
    again = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=2, seed=1)
    again.set_epoch(2)
    assert list(again) == batches  # a function of (seed, epoch): resumes and other process counts agree
    again.set_epoch(3)
    assert list(again) != batches


def test_a_pk_epoch_uses_every_image_when_groups_fit():
    labels = [c for c in range(4) for _ in range(4)]
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=2, samples_per_class=2, seed=0)
    seen = sorted(i for b in sampler for i in b)
    assert seen == list(range(16))
    with pytest.raises(Exception, match="at least 2 classes of 2 images"):
        ClassBalancedBatchSampler(labels, classes_per_batch=1, samples_per_class=2)
