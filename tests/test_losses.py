"""fgclf.losses against torch / numpy references on tiny CPU tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.losses import (LpPenalty, class_balanced_weights, create_loss, create_regularizer, list_losses,
                          list_regularizers)

C = 4
# options exercised per loss on top of the defaults (a loss missing here is still tested with defaults)
OPTIONS = {
    "ce": [{"label_smoothing": 0.2}, {"class_weights": [1.0, 2.0, 0.5, 3.0]},
           {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5, 3.0]}],
    "label_smoothing": [{"class_weights": [0.3, 1.0, 2.0, 1.0]}],
    "focal": [{"gamma": 0.5}, {"alpha": [0.25, 1.0, 0.5, 2.0]}, {"alpha": 0.25, "gamma": 1.0},
              {"gamma": 3.0, "alpha": [0.25, 1.0, 0.5, 2.0], "class_weights": [1.0, 2.0, 0.5, 3.0]}],
}
CASES = [(name, kw) for name in list_losses() for kw in [{}, *OPTIONS.get(name, [])]]


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, C, generator=g)).double()
    return logits, torch.tensor([0, 3, 1, 1, 2, 3][:n])


def _soft(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, C, generator=g).double(), 1)  # rows sum to 1 in float64


def _value_and_grad(loss: nn.Module, logits: torch.Tensor, target: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    return value.detach(), x.grad


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


# ---------------------------------------------------------------- every registered loss
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(k) or 'default'}" for n, k in CASES])
def test_index_and_one_hot_targets_agree(name, kw):
    loss = create_loss(name, **kw)
    logits, y = _batch()
    v_int, g_int = _value_and_grad(loss, logits, y)
    v_soft, g_soft = _value_and_grad(loss, logits, F.one_hot(y, C).double())
    assert v_int.ndim == 0 and math.isfinite(float(v_int))
    torch.testing.assert_close(v_soft, v_int, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_soft, g_int, rtol=1e-10, atol=1e-12)
    # int32 indices work too, and soft (mixup-like) rows give a finite value and gradient
    torch.testing.assert_close(loss(logits, y.int()), v_int)
    v_mix, g_mix = _value_and_grad(loss, logits, _soft())
    assert math.isfinite(float(v_mix)) and torch.isfinite(g_mix).all()


@pytest.mark.parametrize("name", list_losses())
def test_bad_target_shapes_raise(name):
    loss = create_loss(name)
    logits, y = _batch()
    with pytest.raises(ValueError, match="target"):
        loss(logits, y[:3])
    with pytest.raises(ValueError, match="soft targets"):
        loss(logits, torch.zeros(6, C + 1, dtype=torch.float64))


# ---------------------------------------------------------------- cross-entropy family
def test_ce_matches_torch_including_smoothing_and_weights():
    logits, y = _batch()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    for eps in (0.0, 0.1, 0.3):
        ours = create_loss("ce", label_smoothing=eps, class_weights=w)(logits, y)
        assert torch.equal(ours, F.cross_entropy(logits, y, weight=w, label_smoothing=eps))
    assert torch.equal(create_loss("label_smoothing")(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.equal(create_loss("ce")(logits, y), F.cross_entropy(logits, y))
    # weighted mean by hand: sum w_y l_i / sum w_y
    per_sample = F.cross_entropy(logits, y, reduction="none")
    hand = (w[y] * per_sample).sum() / w[y].sum()
    torch.testing.assert_close(create_loss("ce", class_weights=w.tolist())(logits, y), hand)


def test_label_smoothing_hand_formula():
    logits, y = _batch()
    logp = torch.log_softmax(logits, 1)
    eps = 0.1
    hand = -((1 - eps) * logp.gather(1, y[:, None]).squeeze(1) + eps / C * logp.sum(1)).mean()
    torch.testing.assert_close(create_loss("label_smoothing")(logits, y), hand)


def test_soft_targets_match_timm_and_torch():
    from timm.loss import SoftTargetCrossEntropy

    logits, _ = _batch()
    t = _soft()
    reference = SoftTargetCrossEntropy()(logits, t)
    for name in ("soft_target_ce", "ce"):
        torch.testing.assert_close(create_loss(name)(logits, t), reference, rtol=1e-12, atol=1e-12)
    # unweighted soft targets with smoothing: torch's probability-target path
    torch.testing.assert_close(create_loss("ce", label_smoothing=0.2)(logits, t),
                               F.cross_entropy(logits, t, label_smoothing=0.2))


def test_soft_targets_weighted_mean_by_hand():
    logits, _ = _batch()
    t = _soft()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    eps = 0.1
    logp = torch.log_softmax(logits, 1)
    smoothed = (1 - eps) * t + eps / C
    hand = -(w * smoothed * logp).sum() / (w * t).sum()
    torch.testing.assert_close(create_loss("ce", label_smoothing=eps, class_weights=w)(logits, t), hand)


# ---------------------------------------------------------------- focal
def _np_focal(logits, target, gamma, alpha=None, weights=None) -> float:
    """Direct numpy focal loss; ``target`` indices or soft rows (soft generalisation)."""
    x = logits.numpy()
    logp = _np_log_softmax(x)
    p = np.exp(logp)
    t = np.eye(C)[target.numpy()] if target.ndim == 1 else target.numpy()
    a = np.ones(C) if alpha is None else np.broadcast_to(np.asarray(alpha, dtype=float), (C,))
    w = np.ones(C) if weights is None else np.asarray(weights, dtype=float)
    terms = -t * a * (1 - p) ** gamma * logp  # (N, C)
    return float((terms * w).sum() / (t * w).sum())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, [0.25, 1.0, 0.5, 2.0]])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 3.0]])
@pytest.mark.parametrize("soft", [False, True])
def test_focal_against_numpy(gamma, alpha, weights, soft):
    logits, y = _batch()
    target = _soft() if soft else y
    ours = create_loss("focal", gamma=gamma, alpha=alpha, class_weights=weights)(logits, target)
    assert float(ours) == pytest.approx(_np_focal(logits, target, gamma, alpha, weights), rel=1e-10)


def test_focal_hand_value_single_sample():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64), torch.tensor([1])
    p1 = math.exp(0.0) / (math.exp(2.0) + 1 + math.exp(-1.0))
    expected = -0.5 * (1 - p1) ** 2 * math.log(p1)
    assert float(create_loss("focal", alpha=[1.0, 0.5, 1.0])(logits, y)) == pytest.approx(expected, rel=1e-12)


def test_focal_gamma0_equals_ce_exactly():
    logits, y = _batch()
    w = [1.0, 2.0, 0.5, 3.0]
    for kw in ({}, {"class_weights": w}):
        focal, ce = create_loss("focal", gamma=0.0, **kw), create_loss("ce", **kw)
        for target in (y, _soft()):
            v_f, g_f = _value_and_grad(focal, logits, target)
            v_c, g_c = _value_and_grad(ce, logits, target)
            assert torch.equal(v_f, v_c) and torch.equal(g_f, g_c)


def test_focal_downweights_easy_examples_and_is_finite_when_confident():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    focal = create_loss("focal", gamma=2.0)
    ratio_easy = float(focal(logits[:1], y[:1]) / ce[0])
    ratio_hard = float(focal(logits[1:], y[1:]) / ce[1])
    assert ratio_easy < 1e-6 < ratio_hard < 1
    # p rounds to exactly 1: gamma < 1 would give an infinite (1-p)^gamma gradient without the clamp
    v, g = _value_and_grad(create_loss("focal", gamma=0.5), torch.tensor([[200.0, 0.0, 0.0, 0.0]]), y[:1])
    assert torch.isfinite(v) and torch.isfinite(g).all()


# ---------------------------------------------------------------- class-balanced weights
def test_class_balanced_weights_hand_values():
    counts = [10, 100, 1000]
    beta = 0.999
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    expected = [3 * r / sum(raw) for r in raw]
    got = class_balanced_weights(counts, beta=beta)
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(expected, rel=1e-6)
    assert got.tolist() == pytest.approx([2.677839, 0.280000, 0.042160], abs=1e-6)
    inv = class_balanced_weights(torch.tensor(counts), kind="inverse")
    assert inv.tolist() == pytest.approx([3 * (1 / n) / (0.1 + 0.01 + 0.001) for n in counts], rel=1e-6)
    assert class_balanced_weights([5, 50, 7], beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert float(class_balanced_weights([3, 1, 4, 1, 5], beta=0.9).sum()) == pytest.approx(5.0)
    # beta -> 1 approaches 1/n
    assert class_balanced_weights(counts, beta=1 - 1e-9).tolist() == pytest.approx(inv.tolist(), rel=1e-4)


def test_class_balanced_weights_feed_the_loss():
    logits, y = _batch()
    w = class_balanced_weights([50, 10, 5, 100])
    ours = create_loss("ce", class_weights=w)(logits, y)
    torch.testing.assert_close(ours, F.cross_entropy(logits, y, weight=w.double()))


@pytest.mark.parametrize("kwargs,match", [
    ({"counts": [3, 0, 2]}, "count >= 1"),
    ({"counts": [3, 2], "beta": 1.0}, "beta"),
    ({"counts": [3, 2], "kind": "sqrt"}, "kind"),
    ({"counts": [[3, 2]]}, "one count per class"),
])
def test_class_balanced_weights_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        class_balanced_weights(**kwargs)


# ---------------------------------------------------------------- bad names and options
@pytest.mark.parametrize("call,match", [
    (lambda: create_loss("focall"), "unknown loss 'focall'; did you mean: focal"),
    (lambda: create_loss("focal", gamma=-1.0), "gamma"),
    (lambda: create_loss("focal", gama=1.0), "unexpected option 'gama'; did you mean: gamma"),
    (lambda: create_loss("focal", alpha=-0.5), "alpha"),
    (lambda: create_loss("soft_target_ce", label_smoothing=0.1), "unexpected option 'label_smoothing'"),
    (lambda: create_loss("ce", label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (lambda: create_loss("ce", class_weights=[1.0, -1.0]), "class_weights"),
    (lambda: create_loss("ce", class_weights=[[1.0, 2.0]]), "class_weights"),
    (lambda: create_regularizer("l3", weight=1.0), "unknown regularizer 'l3'; did you mean"),
    (lambda: create_regularizer("lp", weight=1.0), "regularizer 'lp' needs p"),
    (lambda: create_regularizer("l1"), "needs weight"),
    (lambda: create_regularizer("lp", p=0.5, weight=1.0), "p must be >= 1"),
    (lambda: create_regularizer("l2", weight=-1.0), "weight"),
    (lambda: create_regularizer("l1", weight=1.0, include="biases"), "include"),
    (lambda: create_regularizer("l1", weight=1.0, p=3), "unexpected option 'p'"),
])
def test_bad_names_and_options_raise_user_errors(call, match):
    with pytest.raises(UserError, match=match):
        call()


@pytest.mark.parametrize("name,kw", [("ce", {"class_weights": [1.0, 2.0, 3.0]}),
                                     ("label_smoothing", {"class_weights": [1.0] * 5}),
                                     ("focal", {"class_weights": [1.0, 2.0, 3.0]}),
                                     ("focal", {"alpha": [1.0, 2.0]})])
def test_wrong_number_of_class_values_raises_on_first_call(name, kw):
    loss = create_loss(name, **kw)
    logits, y = _batch()
    with pytest.raises(UserError, match=f"but the logits have {C} classes"):
        loss(logits, y)


# ---------------------------------------------------------------- regularisers
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 2)
        self.norm = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2)
        self.pos_embed = nn.Parameter(torch.randn(1, 3, generator=g))
        self.frozen.requires_grad_(False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.fc.weight[0, 0] = 5.0  # a unique largest |theta| among the selected weights
            self.frozen.weight[0, 0] = 50.0  # larger, but frozen: p=inf must ignore it


def _direct(model: _Tiny, names: list[str], p: float) -> float:
    params = dict(model.named_parameters())
    flat = np.concatenate([params[n].detach().numpy().ravel() for n in names])
    return float(np.abs(flat).max()) if math.isinf(p) else float((np.abs(flat) ** p).sum())


@pytest.mark.parametrize("p", [1, 2, 3, math.inf, "inf"])
def test_lp_penalty_against_direct_computation(p):
    model, weight = _Tiny(), 0.01
    penalty = LpPenalty(p, weight)
    assert [n for n, _ in penalty.selected(model)] == ["conv.weight", "fc.weight"]
    pf = float(p)
    assert penalty(model).item() == pytest.approx(weight * _direct(model, ["conv.weight", "fc.weight"], pf),
                                                  rel=1e-6)
    # include="all" adds other 2-D+ trainable parameters; without exclusion, norms and biases too
    all_2d = ["conv.weight", "fc.weight", "pos_embed"]
    assert LpPenalty(p, weight, include="all")(model).item() == pytest.approx(weight * _direct(model, all_2d, pf),
                                                                              rel=1e-6)
    everything = [n for n, q in model.named_parameters() if q.requires_grad]
    assert "frozen.weight" not in everything and "norm.weight" in everything
    assert LpPenalty(p, weight, include="all", exclude_norm_bias=False)(model).item() == pytest.approx(
        weight * _direct(model, everything, pf), rel=1e-6)


def test_lp_penalty_inf_is_the_largest_trainable_weight():
    model = _Tiny()
    assert create_regularizer("lp", p=math.inf, weight=2.0)(model).item() == pytest.approx(10.0)
    model.frozen.requires_grad_(True)  # re-selected on every call: unfreezing is picked up
    assert create_regularizer("lp", p="inf", weight=2.0)(model).item() == pytest.approx(100.0)


def test_named_regularizers_are_lp_penalties():
    model = _Tiny()
    assert set(list_regularizers()) == {"l1", "l2", "lp"}
    for name, p in (("l1", 1), ("l2", 2)):
        reg = create_regularizer(name, weight=0.5)
        assert reg(model).item() == pytest.approx(LpPenalty(p, 0.5)(model).item())
        assert reg.p == p
    torch.testing.assert_close(create_regularizer("l2", weight=0.5)(model),
                               0.5 * (model.conv.weight.square().sum() + model.fc.weight.square().sum()))


def test_l1_gradient_is_weight_times_sign():
    model, weight = _Tiny(), 0.03
    create_regularizer("l1", weight=weight)(model).backward()
    for name, param in model.named_parameters():
        if name in ("conv.weight", "fc.weight"):
            torch.testing.assert_close(param.grad, weight * torch.sign(param.detach()))
        else:
            assert param.grad is None, name  # biases, norms, pos_embed and frozen params untouched


def test_l2_and_inf_gradients():
    model, weight = _Tiny(), 0.1
    create_regularizer("l2", weight=weight)(model).backward()
    torch.testing.assert_close(model.fc.weight.grad, 2 * weight * model.fc.weight.detach())
    model.zero_grad(set_to_none=True)
    create_regularizer("lp", p=math.inf, weight=weight)(model).backward()
    expected = torch.zeros_like(model.fc.weight)
    expected[0, 0] = weight  # only the largest |theta| gets gradient
    torch.testing.assert_close(model.fc.weight.grad, expected)
    assert not model.conv.weight.grad.any()


def test_penalty_selecting_nothing_raises():
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(UserError, match="selects no trainable parameters"):
        create_regularizer("l1", weight=1.0)(model)


@pytest.mark.parametrize("name,soft", [("ce", False), ("focal", False), ("ce", True)])
def test_class_weighted_mean_over_two_processes_equals_the_whole_batch(name, soft):
    """Two data-parallel shards: the average of their GlobalWeightedMean losses (what DDP's gradient
    averaging optimises) equals the single-process weighted mean; the plain per-shard means do not."""
    from fgclf.losses import GlobalWeightedMean

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 2, 3, 3, 1])  # shard 0 holds the frequent class, shard 1 the rare ones
    target = torch.nn.functional.one_hot(y, 4).float() * 0.8 + 0.05 if soft else y
    loss = create_loss(name, class_weights=[0.5, 2.0, 3.0, 1.0])
    whole = loss(logits, target)
    shards = [slice(0, 4), slice(4, 8)]
    total = sum(loss.weight_sum(logits[s], target[s]) for s in shards)

    class TwoProcesses:  # accelerate's reduce("sum") across the two shards
        num_processes = 2

        def reduce(self, tensor, op):
            assert op == "sum"
            return total.detach().clone()

    wrapped = GlobalWeightedMean(loss, TwoProcesses())
    ddp = sum(wrapped(logits[s], target[s]) for s in shards) / 2
    naive = sum(loss(logits[s], target[s]) for s in shards) / 2
    assert float(ddp) == pytest.approx(float(whole), rel=1e-6)
    assert abs(float(naive) - float(whole)) > 1e-3  # the defect: per-process normalisation
    g_whole, = torch.autograd.grad(whole, logits)
    g_ddp, = torch.autograd.grad(ddp, logits)
    torch.testing.assert_close(g_ddp, g_whole)
