"""SAM / ASAM (--train.sam_rho, --train.sam_adaptive): each update equals the two-step formula computed
by hand on a quadratic, with gradient accumulation and the step's random draws replayed; BatchNorm's
running statistics move once per batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgclf.engine import FitOptions, TrainState, train_one_epoch
from fgclf.methods import StepParts, create_method
from fgclf.optim import create_scheduler
from fgclf.runtime import create_accelerator
from fgclf.sam import SAM


def _run(model, data, *, rho, adaptive, accum, loss_fn, lr=0.1, batch_size=2):
    acc = create_accelerator(log_with=None, grad_accum_steps=accum)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=len(data) // batch_size // accum)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    model, opt, loader = acc.prepare(model, opt, loader)
    sam = SAM(model.parameters(), rho=rho, adaptive=adaptive) if rho else None
    method = create_method("plain", parts=StepParts(loss_fn=loss_fn))
    state = TrainState()
    train_one_epoch(acc, model, loader, opt, sched, method, state=state, options=FitOptions(progress=False, sam=sam))
    return state


@pytest.mark.parametrize("adaptive", [False, True])
def test_each_update_is_the_two_step_formula(adaptive):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    draws = []

    def loss_fn(out, target):  # a quadratic with a random factor: the second pass must draw the same one
        r = torch.rand(())
        draws.append(float(r))
        return ((out.squeeze(1) - target) ** 2).mean() * (1 + r)
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    w = model.weight.detach().clone().double()
    rho, lr = 0.3, 0.1
    state = _run(model, TensorDataset(x, y), rho=rho, adaptive=adaptive, accum=2, loss_fn=loss_fn, lr=lr)
    assert state.global_step == 2
    # per update: two micro-batches, first pass then the replayed second pass, same random factors
    assert len(draws) == 8 and draws[0:2] == draws[2:4] and draws[4:6] == draws[6:8]
    xs, ys = x.double(), y.double()

    def grad(weights, update):  # the accumulated gradient: the mean of the two micro-batch losses
        weights = weights.clone().requires_grad_(True)
        total = 0
        for k in range(2):
            i = slice(4 * update + 2 * k, 4 * update + 2 * k + 2)
            r = draws[4 * update + k]
            total = total + ((xs[i] @ weights.T).squeeze(1) - ys[i]).pow(2).mean() * (1 + r) / 2
        return torch.autograd.grad(total, weights)[0]
    for update in range(2):
        g1 = grad(w, update)
        scale = w.abs() if adaptive else 1.0
        e = (w ** 2 if adaptive else 1.0) * g1 * rho / (scale * g1).norm()
        w = w - lr * grad(w + e, update)
    torch.testing.assert_close(model.weight.detach().double(), w, atol=1e-6, rtol=1e-6)


def test_running_statistics_move_once_and_the_random_streams_go_on_as_without_sam():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1]))
    runs = {}
    for rho in (0.0, 0.05):
        model = build()
        torch.manual_seed(5)
        _run(model, data, rho=rho, adaptive=False, accum=1, loss_fn=nn.CrossEntropyLoss(), batch_size=4)
        runs[rho] = (model[1].running_mean.clone(), int(model[1].num_batches_tracked), torch.rand(3))
    # one batch, one update: the statistics of the first pass at the same weights, counted once
    torch.testing.assert_close(runs[0.05][0], runs[0.0][0])
    assert runs[0.05][1] == runs[0.0][1] == 1
    torch.testing.assert_close(runs[0.05][2], runs[0.0][2])  # the second pass drew nothing new


def test_a_zero_or_non_finite_gradient_moves_nothing():
    p = nn.Parameter(torch.ones(3))
    sam = SAM([p], rho=0.1)
    p.grad = torch.zeros(3)
    assert not sam.perturb()
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not sam.perturb() and torch.equal(p.detach(), torch.ones(3))


def test_the_second_pass_sees_the_same_mixed_images():
    """timm's Mixup mixes in place and draws its lambda from numpy: the replay starts from the original
    images and the same draws, so both passes see the same mixed batch and targets."""
    from fgclf.data.mixup import create_mixup

    seen, targets = [], []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.conv(x).mean((2, 3))

    def loss_fn(out, target):
        targets.append(target.clone())
        return nn.functional.cross_entropy(out, target)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(4, 3, 4, 4, generator=g), torch.tensor([0, 1, 0, 1]))
    mixup = create_mixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.0, num_classes=2)
    acc = create_accelerator(log_with=None)
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=2)
    loader = DataLoader(data, batch_size=2, shuffle=False)
    model, opt, loader = acc.prepare(model, opt, loader)
    method = create_method("plain", parts=StepParts(loss_fn=loss_fn, mixup=mixup))
    train_one_epoch(acc, model, loader, opt, sched, method, state=TrainState(),
                    options=FitOptions(progress=False, sam=SAM(model.parameters(), rho=0.05)))
    assert len(seen) == 4
    for first, second in ((0, 1), (2, 3)):
        torch.testing.assert_close(seen[second], seen[first])
        torch.testing.assert_close(targets[second], targets[first])
    assert not torch.allclose(seen[0], data.tensors[0][:2])  # it was mixed


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_perturbation_does_not_depend_on_the_loss_scale(adaptive):
    """fp16 runs hold gradients times the GradScaler's scale when SAM perturbs: e is the same as from the
    unscaled gradients, so nothing needs unscaling before the step."""
    torch.manual_seed(0)
    moved = []
    for scale in (1.0, 2.0 ** 16):
        p = nn.Parameter(torch.randn(5))
        with torch.no_grad():
            p.copy_(torch.arange(1.0, 6.0))
        p.grad = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.05]) * scale
        sam = SAM([p], rho=0.5, adaptive=adaptive)
        assert sam.perturb()
        moved.append(p.detach().clone())
        sam.restore()
        torch.testing.assert_close(p.detach(), torch.arange(1.0, 6.0))
    torch.testing.assert_close(moved[0], moved[1])


def test_running_statistics_are_restored_even_after_an_overflowing_pass():
    from fgclf.sam import frozen_running_stats

    bn = nn.BatchNorm1d(2)
    before = bn.running_var.clone()
    bn.train()
    with frozen_running_stats(bn):
        bn(torch.tensor([[float("inf"), 1.0], [0.0, 2.0]]))
        assert not torch.isfinite(bn.running_var).all()  # what a zero momentum would have left behind
    torch.testing.assert_close(bn.running_var, before)


def test_with_gradual_unfreezing_frozen_stages_are_neither_perturbed_nor_moved():
    import timm

    from fgclf.unfreeze import GradualUnfreeze

    torch.manual_seed(0)
    acc = create_accelerator(log_with=None)
    model = timm.create_model("test_resnet", num_classes=3)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=2)
    model, opt, loader = acc.prepare(model, opt, DataLoader(data, batch_size=4))
    unfreeze = GradualUnfreeze(acc.unwrap_model(model), "0:head")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam = SAM(model.parameters(), rho=0.5)
    perturbed = []
    real_perturb = sam.perturb

    def spy():
        moved = real_perturb()
        perturbed.append({p for p, _ in sam._offsets})
        return moved
    sam.perturb = spy
    train_one_epoch(acc, model, loader, opt, sched, create_method("plain", parts=StepParts(loss_fn=nn.CrossEntropyLoss())),
                    state=TrainState(), options=FitOptions(progress=False, sam=sam, unfreeze=unfreeze,
                                                           train_mode=unfreeze.train_mode(lambda m: m.train())))
    head = {id(p) for n, p in model.named_parameters() if n.startswith("fc.")}
    assert perturbed and all({id(p) for p in moved} == head for moved in perturbed)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) != name.startswith("fc."), name
