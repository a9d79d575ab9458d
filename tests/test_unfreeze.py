"""Gradual unfreezing (--model.unfreeze): each epoch trains exactly the scheduled parameters (the others,
their optimizer state and their BatchNorm statistics stay as they were), and a run resumed across a
boundary equals the uninterrupted one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from conftest import last_error_line, train_toy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgclf.checkpoint import Checkpointer
from fgclf.engine import FitOptions, TrainState, fit
from fgclf.errors import UserError
from fgclf.optim import create_scheduler
from fgclf.runtime import create_accelerator
from fgclf.transfer import stage_groups
from fgclf.unfreeze import GradualUnfreeze, parse_schedule


@pytest.mark.parametrize("spec,message", [("1:head", "must start at epoch 0"), ("0:head,0:all", "must increase"),
                                          ("0:body", "bad entry"), ("0:head;2:all", "bad entry")])
def test_bad_schedules_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_schedule(spec)


def test_each_epoch_trains_exactly_the_scheduled_parameters(tmp_path):
    torch.manual_seed(0)
    acc = create_accelerator(log_with=None)
    model = timm.create_model("test_resnet", num_classes=3)
    groups = stage_groups(model)  # 0 stem, 1-4 layer1-4, 5 head
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = create_scheduler(opt, name="constant", epochs=3, updates_per_epoch=2)
    model, opt, train = acc.prepare(model, opt, DataLoader(data, batch_size=8, shuffle=True))
    unfreeze = GradualUnfreeze(acc.unwrap_model(model), "0:head,1:stage3,2:all")
    snapshots = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    states = []

    def snap(state):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        states.append({id(p) for p in opt.state})
    ck = Checkpointer(acc, tmp_path, meta={"model_name": "test_resnet", "num_classes": 3, "class_names": list("abc"),
                                           "model_kwargs": {}, "peft": None})
    ck.save_best = ck.save_last = lambda *a: None
    fit(acc, model, train, None, opt, sched, nn.CrossEntropyLoss(), state=TrainState(), checkpointer=ck,
        run_dir=tmp_path, num_classes=3, options=FitOptions(epochs=3, progress=False, epoch_callbacks=(snap,),
                                                            unfreeze=unfreeze,
                                                            train_mode=unfreeze.train_mode(lambda m: m.train())))
    params = dict(model.named_parameters())
    expected = {0: set(groups[5]), 1: set(groups[5]) | set(groups[3]) | set(groups[4]), 2: set(params)}
    for epoch in range(3):
        before, after = snapshots[epoch], snapshots[epoch + 1]
        changed = {n for n in params if not torch.equal(before[n], after[n])}
        assert changed == expected[epoch], epoch
        assert {id(params[n]) for n in expected[epoch]} <= states[epoch]  # moments only for what trained so far
        assert not ({id(params[n]) for n in set(params) - set().union(*[expected[e] for e in range(epoch + 1)])}
                    & states[epoch])
        stats = {n for n in before if "running_mean" in n and not torch.equal(before[n], after[n])}
        layers_trained = {n.rsplit(".", 1)[0] for n in expected[epoch]}
        assert stats == {n for n in before if "running_mean" in n and n.rsplit(".", 1)[0] in layers_trained}, epoch


ARGS = ("--model.name", "test_efficientnet", "--data.num_workers", "2", "--data.aug.preset", "basic",
        "--train.epochs", "2", "--optim.lr", "0.003", "--train.seed", "3", "--model.unfreeze", "0:head,1:all")


def test_resume_across_the_boundary_equals_the_uninterrupted_run(toy_root, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_toy(toy_root, whole, *ARGS)
    history = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["trainable_params"] < history[1]["trainable_params"]
    proc = train_toy(toy_root, cut, *ARGS, check=False, env={"FGCLF_DEBUG_SIGNAL_AT_STEP": "3"})
    assert proc.returncode != 0 and "stopped by SIGTERM at epoch 1" in proc.stderr, proc.stderr[-2000:]
    train_toy(toy_root, cut, *ARGS, "--resume", "last")
    np.testing.assert_allclose(np.load(cut / "predictions.npz")["logits"], np.load(whole / "predictions.npz")["logits"],
                               atol=1e-6)
    proc = train_toy(toy_root, tmp_path / "bad", *ARGS[:-2], "--model.unfreeze", "0:head,1:stage9", check=False)
    assert proc.returncode == 2 and "has stages 1..5" in last_error_line(proc)
    assert not (tmp_path / "bad").exists()
