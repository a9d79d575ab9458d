"""The method registry, its user errors, the prediction penalties, and ``plain`` = the engine before methods."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgclf.errors import UserError
from fgclf.losses import create_logit_penalty, list_logit_penalties
from fgclf.methods import StepContext, StepParts, create_method, list_methods


def test_registry_lists_the_methods_and_refuses_unknown_names_and_foreign_options():
    assert {"plain", "bcnn", "cbp", "isqrt_cov"} <= set(list_methods())
    with pytest.raises(UserError, match="unknown method 'bcn'; did you mean: bcnn"):
        create_method("bcn")
    with pytest.raises(UserError, match=r"method.sketch_dim is an option of cbp, not of method bcnn"):
        create_method("bcnn", sketch_dim=512)
    with pytest.raises(UserError, match="method plain got unexpected option 'foo'"):
        create_method("plain", foo=1)
    assert create_method("cbp", sketch_dim=512).metadata() == {
        "name": "cbp", "options": {"reduce_dim": None, "dropout": 0.0, "sketch_dim": 512, "seed": 0}}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("batch", [6, 7])
def test_pairwise_confusion_equals_numpy(batch):
    logits = torch.randn(batch, 4, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    p = _softmax(logits.numpy())
    expected = sum(((p[2 * k] - p[2 * k + 1]) ** 2).sum() for k in range(batch // 2)) / batch
    assert float(create_logit_penalty("pairwise", weight=3.0)(logits)) == pytest.approx(3.0 * expected, rel=1e-6)


def test_entropy_penalty_is_minus_the_mean_entropy():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = _softmax(logits.numpy())
    expected = (p * np.log(p)).sum(1).mean()
    assert float(create_logit_penalty("entropy", weight=0.5)(logits)) == pytest.approx(0.5 * expected, rel=1e-6)
    uniform = torch.zeros(3, 4)  # the maximum entropy log(4): the lowest penalty
    assert float(create_logit_penalty("entropy", weight=1.0)(uniform)) == pytest.approx(-np.log(4), rel=1e-6)


def test_penalties_average_over_processes_like_the_whole_batch():
    """DDP averages the processes' losses: with neighbour pairs that equals one process's value."""
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    for name in list_logit_penalties():
        penalty = create_logit_penalty(name, weight=1.0)
        halves = (penalty(logits[:4]) + penalty(logits[4:])) / 2
        torch.testing.assert_close(halves, penalty(logits))
    with pytest.raises(UserError, match="confusion_weight must be a finite number >= 0"):
        create_logit_penalty("pairwise", weight=-1)


def test_step_context_draws_belong_to_the_sample_not_the_process():
    class Acc:
        def __init__(self, index: int, n: int) -> None:
            self.process_index, self.num_processes = index, n

    whole = StepContext(accelerator=Acc(0, 1), seed=3, epoch=2, batch_index=5).uniform(8, 2)
    parts = [StepContext(accelerator=Acc(r, 2), seed=3, epoch=2, batch_index=5).uniform(4, 2) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(parts), whole)
    other = StepContext(accelerator=Acc(0, 1), seed=3, epoch=2, batch_index=6).uniform(8, 2)
    assert not torch.equal(other, whole)


def _reference_epoch(model, loader, optimizer, scheduler, parts: StepParts, clip: float) -> list[float]:
    """fgclf's training loop before methods existed (engine.train_one_epoch of 2026-12-02), on one process."""
    model.train()
    losses = []
    for images, labels in loader:
        if parts.mixup is not None:
            images, labels = parts.mixup(images, labels)
        logits = model(images)
        loss = parts.loss_fn(logits.float(), labels)
        if parts.regularizer is not None:
            loss = loss + parts.regularizer(model)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step_update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_plain_trains_exactly_as_the_engine_did_before_methods():
    """A BatchNorm model with dropout, mixup/cutmix, an L1 penalty and clipping: the same weights,
    BatchNorm statistics and losses as the reference loop, from the same seeds."""
    from fgclf.data import create_mixup
    from fgclf.engine import FitOptions, TrainState, train_one_epoch
    from fgclf.losses import create_loss, create_regularizer
    from fgclf.optim import create_optimizer, create_scheduler
    from fgclf.runtime import create_accelerator

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % 4)

    def setup():
        torch.manual_seed(0)
        np.random.seed(0)  # timm's Mixup draws from numpy
        model = timm.create_model("test_efficientnet", num_classes=4, drop_rate=0.3)
        opt = create_optimizer(model, name="adamw", lr=3e-3, weight_decay=0.01)
        sched = create_scheduler(opt, name="cosine", epochs=1, updates_per_epoch=3, warmup_epochs=0.5)
        parts = StepParts(loss_fn=create_loss("soft_target_ce"), regularizer=create_regularizer("l1", weight=1e-4),
                          mixup=create_mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9, num_classes=4))
        return model, opt, sched, parts, DataLoader(data, batch_size=8)

    model, opt, sched, parts, loader = setup()
    ref_losses = _reference_epoch(model, loader, opt, sched, parts, clip=0.5)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    acc = create_accelerator(log_with=None)
    model, opt, sched, parts, loader = setup()
    model, opt, loader = acc.prepare(model, opt, loader)
    record = train_one_epoch(acc, model, loader, opt, sched, create_method("plain", parts=parts), state=TrainState(),
                             options=FitOptions(clip_grad_norm=0.5, progress=False, log_every=0))
    state = acc.unwrap_model(model).state_dict()
    for key, value in reference.items():  # weights and BatchNorm statistics, bit for bit
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert len(ref_losses) == 3 and record["train_loss"] == pytest.approx(np.mean(ref_losses), rel=1e-6)


def test_transfer_strategies_and_lr_groups_see_the_backbones_stages_and_the_methods_layers():
    from timm.models import group_parameters

    from fgclf.optim import create_optimizer
    from fgclf.transfer import apply_strategy

    def build():
        return create_method("wsdan", num_maps=4).build(timm.create_model("resnet18", num_classes=3), 3)

    model = build()
    apply_strategy(model, "partial:2")  # stem + layer1 + layer2 of the backbone, as for the plain model
    plain = timm.create_model("resnet18", num_classes=3)
    groups = group_parameters(plain, plain.group_matcher(coarse=True))
    expected = {f"backbone.{n}" for gid, names in groups.items() if gid <= 2 for n in names}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected

    model = build()
    apply_strategy(model, "linear_probe")  # the method's layers are what a probe trains
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"fg_attention", "fg_head"}

    model = build()
    opt = create_optimizer(model, lr=1.0, layer_decay=0.5, head_lr_scale=10)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["fg_head.weight"])] == scale[id(named["fg_attention.0.weight"])] == 10.0
    assert scale[id(named["backbone.layer4.1.conv2.weight"])] == 0.5  # one group below the new layers
    assert scale[id(named["backbone.conv1.weight"])] < scale[id(named["backbone.layer1.0.conv1.weight"])]


def test_continuing_from_an_export_keeps_its_options_and_refuses_other_architectures():
    from fgclf.config import MethodConfig
    from fgclf.methods import method_for_run

    export = {"method": {"name": "wsdan", "options": {**create_method("wsdan", num_maps=4).metadata()["options"]}}}
    method = method_for_run(MethodConfig(name="wsdan"), export=export)  # nothing set: the export's options
    assert method.opts["num_maps"] == 4
    method = method_for_run(MethodConfig(name="wsdan", beta=0.1), export=export)  # a training option may change
    assert method.opts["num_maps"] == 4 and method.opts["beta"] == 0.1
    with pytest.raises(UserError, match="method.num_maps 8 differs from the export's 4"):
        method_for_run(MethodConfig(name="wsdan", num_maps=8), export=export)
    with pytest.raises(UserError, match="trained with method wsdan; continue it with --method.name wsdan"):
        method_for_run(MethodConfig(name="bcnn"), export=export)
    plain_export = {"method": {"name": "plain", "options": {}}}  # a plain export may start any method
    assert method_for_run(MethodConfig(name="bcnn", reduce_dim=8), export=plain_export).opts["reduce_dim"] == 8
