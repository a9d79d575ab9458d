"""Weight EMA (--train.ema_decay): the average equals a hand-rolled one, updated once per optimizer
update with timm's warmed-up decay; best takes the averaged weights when they validate higher."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgclf.checkpoint import Checkpointer
from fgclf.ema import ModelEma
from fgclf.engine import FitOptions, TrainState, fit
from fgclf.optim import create_scheduler
from fgclf.runtime import create_accelerator


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.arange(n) % 3)


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_equals_a_hand_rolled_one_once_per_update(tmp_path, warmup):
    torch.manual_seed(0)
    acc = create_accelerator(log_with=None, grad_accum_steps=2)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = create_scheduler(opt, name="constant", epochs=2, updates_per_epoch=3)
    train = DataLoader(_data(48, 0), batch_size=8, shuffle=True)  # 6 micro-batches: 3 updates an epoch
    val = DataLoader(_data(12, 1), batch_size=6)
    model, opt, train, val = acc.prepare(model, opt, train, val)
    ema = ModelEma(acc.unwrap_model(model), 0.8, warmup=warmup)
    seen = []  # the trained weights after every optimizer update, as the EMA sees them

    def record(state):
        seen.append({k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()})
    saved = []
    ck = Checkpointer(acc, tmp_path, meta={"model_name": "mlp", "num_classes": 3, "class_names": list("abc"),
                                           "model_kwargs": {}, "peft": None})
    ck.save_best = lambda weights, state: saved.append((weights, state.best_weights))
    ck.save_last = lambda state: None
    state = fit(acc, model, train, val, opt, sched, nn.CrossEntropyLoss(), state=TrainState(), checkpointer=ck,
                run_dir=tmp_path, num_classes=3,
                options=FitOptions(epochs=2, progress=False, ema=ema, callbacks=(record,)))
    assert state.global_step == len(seen) == 6
    expected = None
    for t, weights in enumerate(seen, start=1):  # timm ModelEmaV3: decay 0 at the first update (a copy)
        decay = 0.0 if t == 1 else (min(0.8, 1 - (1 + (t - 1)) ** (-2 / 3)) if warmup else 0.8)
        expected = {k: v.clone() for k, v in weights.items()} if expected is None else {
            k: decay * expected[k] + (1 - decay) * weights[k] if weights[k].is_floating_point() else weights[k]
            for k in weights}
    got = ema.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):  # an integer: timm copies it
            assert int(got[key]) == int(value)
            continue
        torch.testing.assert_close(got[key].float(), value, atol=1e-6, rtol=1e-5, msg=key)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for epoch, row in enumerate(history):  # both validated; best took the higher (ties: the raw weights)
        assert "val_ema/top1" in row and "val/top1" in row
    best_row = history[state.best_epoch - 1]
    which = "ema" if best_row["val_ema/top1"] > best_row["val/top1"] else "raw"
    assert state.best_weights == which == saved[-1][1]
    assert (saved[-1][0] is ema.module) == (which == "ema")


def test_state_round_trip_continues_the_same_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    a = ModelEma(model, 0.9)
    for step in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        a.update(model, step)
    b = ModelEma(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 0.9)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        model[0].weight.add_(0.1)
    a.update(model, 4)
    b.update(model, 4)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value)
    assert not any(p.requires_grad for p in a.module.parameters())


def test_frozen_parameters_are_shared_not_copied_and_left_out_of_the_state():
    """PEFT / linear probe: the average of a frozen parameter is itself, so the EMA holds the model's own
    tensor (no second copy) and its state (last/) has the trainable parameters and buffers only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    ema = ModelEma(model, 0.5, warmup=False)
    assert ema.module[0].weight.data_ptr() == model[0].weight.data_ptr()
    assert ema.module[2].weight.data_ptr() != model[2].weight.data_ptr()
    assert set(ema.state_dict()) == set(model.state_dict()) - {"0.weight", "0.bias"}
    start = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight.add_(1.0)
    ema.update(model, 1)  # a copy at the first update
    ema.update(model, 2)
    torch.testing.assert_close(ema.module[2].weight, start + 1.0)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    ema.update(model, 3)  # decay 0.5
    torch.testing.assert_close(ema.module[2].weight, start + 1.5)
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    other = ModelEma(model, 0.5)
    other.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({"9.weight": torch.zeros(1)})
