"""Optimizer and schedule factories against torch's own schedulers and hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.losses import create_loss, list_losses
from fgclf.optim import create_optimizer, create_scheduler, list_optimizers, list_schedulers


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)


def _per_epoch(name: str, epochs: int, metrics=None, **kw) -> list[float]:
    opt = _opt()
    sched = create_scheduler(opt, name=name, epochs=epochs, updates_per_epoch=3, step_on="epoch", **kw)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(3):
            sched.step_update()
        sched.step_epoch(None if metrics is None else metrics[e])
    return out


def _torch_reference(make, epochs: int, metrics=None) -> list[float]:
    opt = _opt()
    sched = make(opt)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step() if metrics is None else sched.step(metrics[e])
    return out


def test_per_epoch_shapes_equal_torch_schedulers():
    lr = torch.optim.lr_scheduler
    assert _per_epoch("cosine", 10) == pytest.approx(_torch_reference(lambda o: lr.CosineAnnealingLR(o, 10), 10))
    assert _per_epoch("multistep", 9, milestones=[3, 6], gamma=0.5) == pytest.approx(
        _torch_reference(lambda o: lr.MultiStepLR(o, [3, 6], 0.5), 9))
    assert _per_epoch("cosine_restarts", 14, restart_epochs=3, restart_mult=2) == pytest.approx(
        _torch_reference(lambda o: lr.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2), 14))
    metrics = [0.1, 0.2, 0.2, 0.2, 0.25, 0.25, 0.25, 0.25, 0.3, 0.3]
    assert _per_epoch("plateau", 10, metrics, plateau_patience=1, gamma=0.5) == pytest.approx(
        _torch_reference(lambda o: lr.ReduceLROnPlateau(o, mode="max", patience=1, factor=0.5), 10, metrics))


def test_per_update_cosine_with_warmup():
    opt = _opt()
    sched = create_scheduler(opt, name="cosine", epochs=5, updates_per_epoch=2, warmup_epochs=1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update()
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (u / 2 - 1) / 4)) for u in range(2, 10)]
    assert lrs == pytest.approx(expected)


def test_scheduler_state_round_trip():
    opt = _opt()
    a = create_scheduler(opt, name="plateau", epochs=5, updates_per_epoch=2, plateau_patience=0)
    for m in (0.5, 0.4, 0.3):
        a.step_update()
        a.step_epoch(m)
    opt2 = _opt()
    b = create_scheduler(opt2, name="plateau", epochs=5, updates_per_epoch=2, plateau_patience=0)
    b.load_state_dict(a.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_plateau_without_metric_is_a_user_error():
    sched = create_scheduler(_opt(), name="plateau", epochs=2, updates_per_epoch=1)
    with pytest.raises(UserError, match="needs a validation metric"):
        sched.step_epoch(None)


def test_no_weight_decay_on_norm_and_bias_and_head_lr_scale():
    import timm

    model = timm.create_model("test_vit", num_classes=3)
    opt = create_optimizer(model, name="adamw", lr=0.1, weight_decay=0.05, head_lr_scale=10)
    for group in opt.param_groups:
        is_head = any(p is model.head.weight or p is model.head.bias for p in group["params"])
        assert group["lr"] == pytest.approx(1.0 if is_head else 0.1)
        assert (group["weight_decay"] > 0) == all(p.ndim > 1 for p in group["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_layer_decay_scales_early_blocks_down():
    import timm

    model = timm.create_model("test_vit", num_classes=3)
    opt = create_optimizer(model, name="sgd", lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == pytest.approx(1.0)
    assert lr_of[id(model.patch_embed.proj.weight)] < lr_of[id(model.blocks[-1].mlp.fc1.weight)] < 1.0
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=1)
    sched.step_update()
    assert {id(p): g["lr"] for g in opt.param_groups for p in g["params"]} == pytest.approx(lr_of)


def test_unknown_names_suggest():
    with pytest.raises(UserError, match="did you mean: adamw"):
        create_optimizer(nn.Linear(2, 2), name="adamww")
    with pytest.raises(UserError, match="unknown lr schedule 'cosin'; did you mean: cosine"):
        create_scheduler(_opt(), name="cosin", epochs=1, updates_per_epoch=1)
    with pytest.raises(UserError, match="unknown loss"):
        create_loss("cee")
    assert {"sgd", "adam", "adamw"} <= set(list_optimizers()) and "ce" in list_losses()
    assert set(list_schedulers()) >= {"plateau", "multistep", "cosine", "cosine_restarts", "constant"}


def test_label_smoothing_loss_matches_hand_formula():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    logp = torch.log_softmax(logits, 1)[0]
    eps = 0.1
    expected = -((1 - eps) * logp[0] + eps / 3 * logp.sum())
    assert float(create_loss("ce", label_smoothing=eps)(logits, y)) == pytest.approx(float(expected))


def _lr_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_peft_head_lr_scale_and_layer_decay_reach_the_base_names(method, name):
    """Under PEFT every name carries ``base_model.model.``; groups must still find the head and blocks."""
    from fgclf.models import apply_peft, create_model

    kwargs = {"img_size": 32} if name == "test_vit" else {}
    model = apply_peft(create_model(name, num_classes=3, **kwargs), method=method, r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".head." in n or ".fc." in n}
    body = trainable - head
    assert head and body  # the saved head and the adapters
    lrs = _lr_by_name(model, create_optimizer(model, name="adamw", lr=1e-3, head_lr_scale=10))
    assert set(lrs) == trainable
    assert all(lrs[n] == pytest.approx(1e-2) for n in head)
    assert all(lrs[n] == pytest.approx(1e-3) for n in body)

    lrs = _lr_by_name(model, create_optimizer(model, name="adamw", lr=1.0, layer_decay=0.5, head_lr_scale=10))
    assert all(lrs[n] == pytest.approx(10.0) for n in head)  # the last layer group: scale 1, times the head's 10
    block = (lambda n: n.split(".layer")[1][0]) if name == "test_resnet" else (lambda n: n.split(".blocks.")[1][0])
    blocked = [n for n in body if (".layer" in n if name == "test_resnet" else ".blocks." in n)]
    per_block = {}
    for n in blocked:
        per_block.setdefault(block(n), set()).add(round(lrs[n], 12))
    assert len(per_block) >= 2 and all(len(v) == 1 for v in per_block.values())  # one scale per block ...
    scales = [next(iter(per_block[k])) for k in sorted(per_block)]
    assert scales == sorted(scales) and len(set(scales)) == len(scales) and scales[-1] < 1.0  # ... rising with depth


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    import timm

    model = timm.create_model("test_vit", num_classes=3, img_size=32)
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    for layer_decay in (None, 0.7):
        opt = create_optimizer(model, name="adamw", lr=0.1, weight_decay=0.05, layer_decay=layer_decay)
        wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert wd_of[id(model.pos_embed)] == 0.0 and wd_of[id(model.cls_token)] == 0.0
        assert wd_of[id(model.blocks[0].attn.qkv.weight)] == 0.05


def _train_steps(name: str, fused: bool, steps: int = 6):
    """A BatchNorm ResNet trained ``steps`` updates in train mode with weight decay and a 10x head lr."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).train()
    opt = create_optimizer(model, name=name, lr=0.01, weight_decay=0.05, head_lr_scale=10, fused=fused)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 48, 48, generator=data), torch.randint(0, 4, (8,), generator=data)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, opt


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_takes_the_same_steps(name):
    """optim.fused: torch's fused kernel, the unfused update up to float rounding, on a real BN model."""
    ref_losses, ref, ref_opt = _train_steps(name, fused=False)
    losses, state, opt = _train_steps(name, fused=True)
    assert opt.defaults["fused"] is True and not ref_opt.defaults.get("fused")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert losses == pytest.approx(ref_losses, rel=1e-5) and ref_losses[-1] != ref_losses[0]
    start = _train_steps(name, True, 0)[1]
    moved = 0
    for key, value in ref.items():
        if value.is_floating_point():
            change = (value - start[key]).abs().max()
            moved += bool(change > 0)
            # Adam's update divides by sqrt(v): rounding shows most where v is tiny, still <1 % of the change
            assert (state[key] - value).abs().max() <= 0.01 * change + 1e-7, key
    assert moved > 10  # the steps changed the weights


def test_fused_is_refused_by_an_optimizer_without_it():
    with pytest.raises(UserError, match=r"optim.fused: lamb has no fused implementation.*\(adam, adamw, sgd"):
        create_optimizer(nn.Linear(2, 2), name="lamb", fused=True)


def test_fused_that_timm_drops_is_refused(monkeypatch):
    """Should timm's mapping of a name stop handing ``fused`` on, the run refuses instead of training unfused."""
    import timm.optim

    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda params, **kw: torch.optim.AdamW(params, lr=kw["lr"]))
    with pytest.raises(UserError, match="optim.fused: timm's adamw built AdamW, which does not run fused"):
        create_optimizer(nn.Linear(2, 2), name="adamw", fused=True)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_loss_scaling_skips_an_overflowing_fused_step_visibly(fused):
    """With fp16 loss scaling, a step whose gradients overflow is skipped, and accelerate must see it (the
    engine does not advance the lr schedule then). torch's fused kernels would skip it inside step(),
    which accelerate counts as taken (accelerate issue #4242); fgclf leaves the skip to GradScaler."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = AcceleratedOptimizer(create_optimizer(model, name="adamw", lr=0.1, fused=fused),
                               scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 4))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.scaler.scale(model(torch.ones(2, 4)).sum() * float("inf")).backward()
    opt.step()
    assert opt.step_was_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.scaler.get_scale() == 2.0 ** 3  # the scale backed off once
    opt.zero_grad()
    opt.scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    opt.step()
    assert not opt.step_was_skipped
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
