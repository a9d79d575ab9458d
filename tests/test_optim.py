"""Optimizer and schedule factories against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.losses import create_loss, list_losses
from fgclf.optim import create_optimizer, create_scheduler, list_optimizers


def _lrs(name: str, steps: int, **kw) -> list[float]:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = create_scheduler(opt, name=name, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup():
    lrs = _lrs("cosine", 10, warmup_steps=2)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)])


def test_multistep_and_constant():
    assert _lrs("multistep", 6, milestones=[2, 4], gamma=0.5) == pytest.approx([1, 1, .5, .5, .25, .25])
    assert _lrs("constant", 3) == [1.0, 1.0, 1.0]


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = create_optimizer(model, name="adamw", lr=0.1, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}


def test_unknown_names_suggest():
    with pytest.raises(UserError, match="did you mean: adamw"):
        create_optimizer(nn.Linear(2, 2), name="adamww")
    with pytest.raises(UserError, match="unknown lr schedule 'cosin'; did you mean: cosine"):
        _lrs("cosin", 2)
    with pytest.raises(UserError, match="unknown loss"):
        create_loss("cee")
    assert {"sgd", "adam", "adamw"} <= set(list_optimizers()) and "ce" in list_losses()


def test_label_smoothing_loss_matches_hand_formula():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    logp = torch.log_softmax(logits, 1)[0]
    eps = 0.1
    expected = -((1 - eps) * logp[0] + eps / 3 * logp.sum())
    assert float(create_loss("ce", label_smoothing=eps)(logits, y)) == pytest.approx(float(expected))
