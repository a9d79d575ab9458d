"""The engine on an in-memory problem: early stopping, best/last checkpoints, exact evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgclf.checkpoint import Checkpointer
from fgclf.engine import FitOptions, TrainState, evaluate, fit
from fgclf.methods import StepParts, create_method
from fgclf.optim import create_scheduler
from fgclf.runtime import create_accelerator


def _problem(n: int = 30, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = torch.arange(n) % classes
    return TensorDataset(x, y)


@pytest.mark.parametrize("lr,patience,expected_epochs", [(0.0, 2, 3), (0.0, 0, 6)])
def test_early_stopping_counts_epochs_without_improvement(tmp_path, lr, patience, expected_epochs):
    torch.manual_seed(0)
    acc = create_accelerator(log_with=None)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = create_scheduler(opt, name="constant", epochs=6, updates_per_epoch=3)
    train = DataLoader(_problem(), batch_size=10, shuffle=True)
    val = DataLoader(_problem(12), batch_size=5)
    model, opt, train, val = acc.prepare(model, opt, train, val)
    meta = {"model_name": "linear", "num_classes": 3, "class_names": list("abc"), "model_kwargs": {}, "peft": None}
    ck = Checkpointer(acc, tmp_path, meta=meta)
    ck.save_best = lambda m, s: None  # plain nn.Linear is not an exportable timm model
    state = fit(acc, model, train, val, opt, sched, nn.CrossEntropyLoss(), state=TrainState(),
                checkpointer=ck, run_dir=tmp_path, num_classes=3,
                options=FitOptions(epochs=6, metric="loss", patience=patience))
    # lr=0: the loss never improves after epoch 1, so stopping comes `patience` epochs later
    assert state.epoch == expected_epochs and state.stopped_early == bool(patience)
    assert state.best_epoch == 1 and state.global_step == 3 * expected_epochs
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, expected_epochs + 1))
    saved = json.loads((tmp_path / "checkpoints/last/trainer_state.json").read_text())
    assert saved["epoch"] == expected_epochs


def test_evaluate_returns_every_sample_once_in_order():
    acc = create_accelerator(log_with=None)
    data = _problem(23)  # uneven last batch
    model = nn.Linear(5, 3)
    loader = acc.prepare(DataLoader(data, batch_size=5))
    out = evaluate(acc, model, loader, loss_fn=nn.CrossEntropyLoss())
    with torch.no_grad():
        ref = model(data.tensors[0])
    np.testing.assert_allclose(out.logits, ref.numpy(), atol=1e-6)  # batched vs whole matmul
    np.testing.assert_array_equal(out.labels, data.tensors[1].numpy())
    assert out.loss == pytest.approx(float(nn.CrossEntropyLoss()(ref, data.tensors[1])), rel=1e-6)


def test_gradient_clipping_limits_the_update_norm():
    """One SGD step (lr=1) with clip_grad_norm=c moves the parameters by exactly norm c."""
    from fgclf.engine import train_one_epoch

    acc = create_accelerator(log_with=None)
    model = nn.Linear(5, 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=1)
    loader = DataLoader(_problem(10), batch_size=10)
    model, opt, loader = acc.prepare(model, opt, loader)
    train_one_epoch(acc, model, loader, opt, sched, nn.CrossEntropyLoss(), state=TrainState(),
                    options=FitOptions(clip_grad_norm=1e-3, progress=False))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-4)


def test_regularizer_gradient_is_added_to_the_loss():
    """One SGD step with an L1 penalty equals the hand step: -lr * (dCE/dθ + w * sign(θ))."""
    from fgclf.engine import train_one_epoch
    from fgclf.losses import create_regularizer

    torch.manual_seed(0)
    acc = create_accelerator(log_with=None)
    model = nn.Linear(5, 3)
    data = _problem(10)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(model.state_dict())
    nn.CrossEntropyLoss()(ref(data.tensors[0]), data.tensors[1]).backward()
    expected_w = ref.weight.detach() - 0.1 * (ref.weight.grad + 0.5 * torch.sign(ref.weight.detach()))
    expected_b = ref.bias.detach() - 0.1 * ref.bias.grad  # biases are not penalised
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=1)
    model, opt, loader = acc.prepare(model, opt, DataLoader(data, batch_size=10))
    method = create_method("plain", parts=StepParts(regularizer=create_regularizer("l1", weight=0.5)))
    train_one_epoch(acc, model, loader, opt, sched, method, state=TrainState(), options=FitOptions(progress=False))
    torch.testing.assert_close(model.weight.detach(), expected_w)
    torch.testing.assert_close(model.bias.detach(), expected_b)


def test_freeze_bn_keeps_running_statistics():
    from fgclf.transfer import apply_strategy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    before = model[1].running_mean.clone()
    apply_strategy(model, "full", freeze_bn=True)(model)
    model(torch.randn(4, 3, 8, 8) + 5)
    assert torch.equal(model[1].running_mean, before) and model[0].training and not model[1].training
    apply_strategy(model, "full")(model)
    model(torch.randn(4, 3, 8, 8) + 5)
    assert not torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("name,n", [("resnet18", 2), ("test_vit", 1), ("tf_efficientnet_lite0", 3)])
def test_partial_freezes_stem_and_first_stages(name, n):
    import timm
    from timm.models import group_parameters

    from fgclf.transfer import apply_strategy

    model = timm.create_model(name, num_classes=4)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    train_mode = apply_strategy(model, f"partial:{n}")
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {k for gid, names in groups.items() if gid <= n for k in names}
    assert all(p.requires_grad for k, p in model.named_parameters() if k.startswith(("fc.", "head.", "classifier.")))
    train_mode(model)
    for module in model.modules():  # frozen BatchNorm layers keep their statistics
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == any(p.requires_grad for p in module.parameters())


def test_partial_out_of_range_is_a_user_error():
    import timm

    from fgclf.errors import UserError
    from fgclf.transfer import apply_strategy

    with pytest.raises(UserError, match="resnet has 4 stages|ResNet has 4 stages"):
        apply_strategy(timm.create_model("resnet18", num_classes=4), "partial:7")


def test_head_init_only_touches_new_heads(tmp_path):
    import timm
    from safetensors.torch import save_file

    from fgclf.models import create_model, save_pretrained
    from fgclf.transfer import head_is_new

    trained = timm.create_model("test_efficientnet", num_classes=4)
    save_pretrained(trained, tmp_path / "export", model_name="test_efficientnet", num_classes=4,
                    class_names=list("abcd"))
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_model(f"file:{tmp_path / 'export'}", num_classes=4)
    assert not head_is_new(model, name=f"file:{tmp_path / 'export'}", pretrained=True, weights=None, num_classes=4)
    assert head_is_new(model, name=f"file:{tmp_path / 'export'}", pretrained=True, weights=None, num_classes=5)
    w = str(tmp_path / "w.safetensors")
    assert not head_is_new(model, name="test_efficientnet", pretrained=True, weights=w, num_classes=4)
    assert head_is_new(model, name="test_efficientnet", pretrained=True, weights=w, num_classes=3)
    assert head_is_new(model, name="tf_efficientnet_lite0.pypi_in1k", pretrained=True, weights=None, num_classes=12)
    assert not head_is_new(model, name="resnet18", pretrained=False, weights=None, num_classes=12)


def test_object_states_round_trip_without_pickle_and_read_legacy_pickles_safely(tmp_path):
    """The lr schedule goes to JSON, an EMA-like module to safetensors; a pre-existing
    custom_checkpoint_<i>.pkl (accelerate's pickle) is read with weights_only=True."""
    import json

    import torch
    from torch import nn

    from fgclf.checkpoint import load_object_states, save_object_states
    from fgclf.optim import create_optimizer, create_scheduler

    model = nn.Linear(3, 2)
    sched = create_scheduler(create_optimizer(model, lr=0.1), name="cosine", epochs=4, updates_per_epoch=5)
    for _ in range(7):
        sched.step_update()
    ema = nn.Linear(3, 2)
    save_object_states(tmp_path / "objects", {"scheduler": sched, "ema": ema})
    assert json.loads((tmp_path / "objects/scheduler.json").read_text())["updates"] == 7
    assert not list(tmp_path.rglob("*.pkl"))
    sched2 = create_scheduler(create_optimizer(nn.Linear(3, 2), lr=0.1), name="cosine", epochs=4, updates_per_epoch=5)
    ema2 = nn.Linear(3, 2)
    load_object_states(tmp_path / "objects", {"scheduler": sched2, "ema": ema2})
    assert sched2.state_dict() == sched.state_dict() and torch.equal(ema2.weight, ema.weight)
    legacy = tmp_path / "state"
    legacy.mkdir()
    torch.save(sched.state_dict(), legacy / "custom_checkpoint_0.pkl")
    sched3 = create_scheduler(create_optimizer(nn.Linear(3, 2), lr=0.1), name="cosine", epochs=4, updates_per_epoch=5)
    load_object_states(tmp_path / "none", {"scheduler": sched3}, legacy_dir=legacy)
    assert sched3.state_dict() == sched.state_dict()
