"""Model accounting: torchsummary's known numbers, exact totals, and the memory estimate vs. a measurement."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.models import apply_peft, create_model
from fgclf.models._summary import (
    MB, estimate_training_memory, format_memory, format_summary, measure_training_memory, summarize_model,
)
from fgclf.transfer import apply_strategy
from conftest import REPO

RESNET18_200 = 11_279_112  # the lab notes' count: 11,689,512 - 513,000 (1000-class fc) + 102,600


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=200)


def _row(summary, label):
    return next(r for r in summary.rows if r.label == label)


def test_resnet18_rows_and_exact_totals(resnet18):
    s = summarize_model(resnet18, input_size=(3, 256, 256))
    first, second, last = s.rows[0], s.rows[1], s.rows[-1]
    assert (first.label, first.name, first.params) == ("Conv2d-1", "conv1", 9_408)
    assert first.output_shape == (-1, 64, 128, 128)
    assert (second.label, second.params) == ("BatchNorm2d-2", 128)
    # leaf rows without timm's Identity placeholders: the classifier is the 61st call
    assert (last.label, last.name, last.output_shape, last.params) == ("Linear-61", "fc", (-1, 200), 102_600)
    assert not any(r.type == "Identity" for r in s.rows)
    assert s.total_params == s.trainable_params == s.row_params == RESNET18_200 and s.frozen_params == 0
    assert s.unattributed == {}
    # buffers apart: running_mean + running_var (C each) + num_batches_tracked per BatchNorm
    bns = [m for m in resnet18.modules() if isinstance(m, nn.BatchNorm2d)]
    assert s.buffers == sum(b.numel() for b in resnet18.buffers()) == sum(2 * m.num_features + 1 for m in bns) == 9_620
    assert s.param_mb == 4 * RESNET18_200 / 2 ** 20
    assert s.buffer_bytes == 4 * (s.buffers - len(bns)) + 8 * len(bns)  # the counters are int64
    assert s.input_mb == 3 * 256 * 256 * 4 / MB
    assert s.activation_mb == pytest.approx(2 * sum(r.output_bytes for r in s.rows) / MB)
    text = format_summary(s)
    assert "Total params: 11,279,112" in text and "Linear-61" in text and "Buffers (not parameters): 9,620" in text


def test_torchsummary_mode_reproduces_torchsummary():
    tv = pytest.importorskip("torchvision")
    # torchsummary's published resnet18 output (1000 classes, 224 px)
    s = summarize_model(tv.models.resnet18(), input_size=(3, 224, 224), rows="torchsummary")
    assert [r.label for r in s.rows[:4]] == ["Conv2d-1", "BatchNorm2d-2", "ReLU-3", "MaxPool2d-4"]
    assert _row(s, "BasicBlock-11").output_shape == (-1, 64, 56, 56)
    assert s.row_params == s.total_params == 11_689_512
    text = format_summary(s)
    for line in ("Input size (MB): 0.57", "Forward/backward pass size (MB): 62.79", "Params size (MB): 44.59",
                 "Estimated Total Size (MB): 107.96"):
        assert line in text
    # the lab notes' rows: 200 classes at 256 px
    s = summarize_model(tv.models.resnet18(num_classes=200), input_size=(3, 256, 256), rows="torchsummary")
    assert (s.rows[0].label, s.rows[0].output_shape, s.rows[0].params) == ("Conv2d-1", (-1, 64, 128, 128), 9_408)
    assert (s.rows[1].label, s.rows[1].params) == ("BatchNorm2d-2", 128)
    assert (s.rows[-1].label, s.rows[-1].output_shape, s.rows[-1].params) == ("Linear-68", (-1, 200), 102_600)
    assert s.total_params == RESNET18_200


def test_torchsummary_mode_on_timm_resnet18_numbers_differently(resnet18):
    s = summarize_model(resnet18, input_size=(3, 64, 64), rows="torchsummary")
    # same function, more modules: drop_block/aa Identities, SelectAdaptivePool2d + Flatten
    assert s.rows[-1].label == "Linear-86" and s.row_params == RESNET18_200


def test_linear_probe_trains_only_the_classifier():
    model = create_model("resnet18", num_classes=200)
    apply_strategy(model, "linear_probe")(model)
    s = summarize_model(model, input_size=(3, 64, 64))
    assert s.trainable_params == 102_600 and s.frozen_params == RESNET18_200 - 102_600
    assert [r.name for r in s.rows if r.trainable] == ["fc"]
    full = estimate_training_memory(create_model("resnet18", num_classes=200), input_size=(3, 64, 64), batch_size=4)
    probe = estimate_training_memory(model, input_size=(3, 64, 64), batch_size=4)
    assert probe["gradients_mb"] == 102_600 * 4 / MB and probe["optimizer_mb"] == 2 * 102_600 * 4 / MB
    assert probe["activations_mb"] < 0.01 < full["activations_mb"]  # frozen body: autograd saves nothing there


def test_vit_parameters_outside_rows_are_named():
    model = create_model("test_vit", num_classes=10)
    s = summarize_model(model, input_size=(3, 160, 160))
    assert set(s.unattributed) == {"cls_token", "pos_embed"}  # held by the root module, not by a leaf
    assert s.row_params + sum(s.unattributed.values()) == s.total_params == sum(p.numel() for p in model.parameters())
    assert "not in any row" in format_summary(s)


def test_peft_counts_trainable_and_unused_copy():
    pytest.importorskip("peft")
    model = apply_peft(create_model("test_vit", num_classes=10), method="lora")
    s = summarize_model(model, input_size=(3, 160, 160))
    assert s.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad) < s.total_params
    # peft keeps a frozen copy of the head that never runs
    assert any("original_module" in n for n in s.unattributed)


def test_summary_leaves_model_state_and_rng_alone(resnet18):
    state = {k: v.clone() for k, v in resnet18.state_dict().items()}
    rng = torch.get_rng_state()
    summarize_model(resnet18, input_size=(3, 64, 64), batch_size=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in resnet18.state_dict().items())  # BN stats restored
    assert resnet18.training


def test_estimate_parts(resnet18):
    kw = dict(input_size=(3, 32, 32), batch_size=8)
    adamw = estimate_training_memory(resnet18, **kw)
    grads = 4 * RESNET18_200 / MB
    assert adamw["weights_mb"] == pytest.approx(grads + 4 * (9_620 - 20) / MB + 8 * 20 / MB)
    assert adamw["gradients_mb"] == grads and adamw["optimizer_mb"] == 2 * grads
    assert estimate_training_memory(resnet18, optimizer="sgd", **kw)["optimizer_mb"] == grads
    assert estimate_training_memory(resnet18, optimizer="none", **kw)["optimizer_mb"] == 0
    bf16 = estimate_training_memory(resnet18, precision="bf16", **kw)
    assert bf16["activations_mb"] == pytest.approx(adamw["activations_mb"] / 2)
    assert bf16["weights_mb"] == adamw["weights_mb"]  # fp32 master weights under autocast
    parts = ("weights_mb", "gradients_mb", "optimizer_mb", "activations_mb", "workspace_mb", "input_mb")
    assert adamw["total_mb"] == pytest.approx(sum(adamw[k] for k in parts))
    # probes at batch 2 and 4 extrapolate to what a batch-8 forward really saves
    direct = summarize_model(resnet18, **kw)
    assert adamw["activations_mb"] == pytest.approx(direct.saved_mb, rel=0.01)
    assert adamw["workspace_mb"] == pytest.approx(2 * direct.largest_bytes / MB, rel=0.01)
    assert adamw["torchsummary_activations_mb"] == pytest.approx(direct.activation_mb, rel=0.01)
    assert "total" in format_memory(adamw)


@pytest.mark.parametrize("kwargs", [dict(optimizer="lamb"), dict(precision="int8")])
def test_estimate_rejects_unknown_choices(resnet18, kwargs):
    with pytest.raises(UserError, match="unknown"):
        estimate_training_memory(resnet18, input_size=(3, 32, 32), batch_size=2, **kwargs)


def test_wrong_input_size_is_a_user_error():
    with pytest.raises(UserError, match="failed at input"):
        summarize_model(create_model("test_vit", num_classes=10), input_size=(1, 160, 160))  # 3-channel stem
    with pytest.raises(UserError, match="rows mode"):
        summarize_model(nn.Linear(2, 2), input_size=(2,), rows="keras")


def _check_measurement(model, size: int, batch: int) -> dict:
    result = measure_training_memory(model, input_size=(3, size, size), batch_size=batch, threads=1)
    assert len(result["peak_per_step_mb"]) == 2 and result["measured_mb"] == max(result["peak_per_step_mb"])
    assert result["ratio"] == pytest.approx(result["estimate_mb"] / result["measured_mb"])
    assert 0.75 <= result["ratio"] <= 1.25, format_memory(result["estimate"], result)
    return result


def test_measured_peak_matches_estimate_quick():
    torch.manual_seed(0)
    result = _check_measurement(create_model("test_vit", num_classes=10), 160, 32)
    assert result["method"].endswith("live allocator")
    assert 0 < result["estimate"]["weights_mb"] < result["measured_mb"]


@pytest.mark.slow
@pytest.mark.parametrize("name,batch", [("resnet18", 4), ("resnet18", 8), ("vit_tiny_patch16_224", 4),
                                        ("vit_tiny_patch16_224", 8)])
def test_measured_peak_matches_estimate(name, batch):
    torch.manual_seed(0)
    model = create_model(name, num_classes=200)
    result = _check_measurement(model, 224, batch)
    # torchsummary's activation convention (2 x module outputs) misses by far more than 25%
    e = result["estimate"]
    torchsummary_total = e["total_mb"] - e["activations_mb"] - e["workspace_mb"] + e["torchsummary_activations_mb"]
    assert torchsummary_total / result["measured_mb"] > 1.3


def _script():
    spec = importlib.util.spec_from_file_location("model_summary_script", REPO / "scripts" / "model_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_prints_table_and_estimate(capsys):
    script = _script()
    assert script.main(["--model", "test_vit", "--num-classes", "10", "--batch-size", "2", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in create_model("test_vit", num_classes=10).parameters())
    assert f"Total params: {n:,}" in out and "input [3, 160, 160]" in out
    assert "Training memory estimate (batch 2, adamw, bf16)" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet81"], "unknown model 'resnet81'"),
    (["--model", "test_vit", "--peft", "lora", "--strategy", "linear_probe"], "exclude each other"),
    (["--model", "vit_tiny_patch16_224", "--input-size", "256"], "failed at input"),  # fixed-size ViT
])
def test_script_user_errors_are_one_line(capsys, argv, message):
    assert _script().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
