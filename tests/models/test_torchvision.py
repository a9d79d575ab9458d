"""tv:<name> models: the wrapper computes exactly what torchvision computes, and plugs into fgclf."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fgclf.errors import UserError
from fgclf.features import pre_logits
from fgclf.models import apply_peft, count_parameters, create_model, default_target_modules, resolve_data_config
from fgclf.models import save_pretrained


def _x(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tv_resnet18():
    from torchvision import models

    torch.manual_seed(0)
    return models.resnet18(num_classes=7).eval()


def test_outputs_and_features_equal_torchvision(tv_resnet18, tmp_path):
    path = tmp_path / "rn18.safetensors"
    save_file({k: v.contiguous() for k, v in tv_resnet18.state_dict().items()}, str(path))
    model = create_model("tv:resnet18", num_classes=None, weights=str(path)).eval()  # torchvision's own keys
    assert model.num_classes == 7 and model.get_classifier() is model.head
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), tv_resnet18(_x()), rtol=0, atol=0)
        body = nn.Sequential(*list(tv_resnet18.children())[:-1])  # everything before fc, then flatten
        torch.testing.assert_close(pre_logits(model, _x()), body(_x()).flatten(1), rtol=0, atol=0)
    assert count_parameters(model)["total"] == sum(p.numel() for p in tv_resnet18.parameters())
    other = create_model("tv:resnet18", num_classes=3, weights=str(path)).eval()  # body kept, new head
    assert other.head.out_features == 3
    torch.testing.assert_close(other.body.layer4[1].conv2.weight, tv_resnet18.layer4[1].conv2.weight)


def test_data_config_comes_from_the_torchvision_weights():
    cfg = resolve_data_config(create_model("tv:efficientnet_b0", num_classes=4))
    # EfficientNet_B0_Weights.IMAGENET1K_V1: resize 256, crop 224, bicubic, ImageNet mean/std
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == pytest.approx(224 / 256)
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_export_round_trip_and_dropout(tmp_path):
    torch.manual_seed(1)
    model = create_model("tv:mobilenet_v3_small", num_classes=5, drop_rate=0.5).eval()
    save_pretrained(model, tmp_path / "export", model_name="tv:mobilenet_v3_small", num_classes=5,
                    class_names=list("abcde"), model_kwargs={"drop_rate": 0.5})
    again = create_model(f"file:{tmp_path / 'export'}", num_classes=5).eval()
    with torch.no_grad():
        assert torch.equal(again(_x()), model(_x()))
    model.train()
    with torch.no_grad():  # drop_rate acts on the pooled features in training, as timm's does
        feats = model.forward_features(_x())
        dropped = model.forward_head(feats, pre_logits=True)
    assert (dropped == 0).float().mean() > 0.3 and model.head_drop.p == 0.5


def test_lora_on_torchvision_resnet_trains_adapters_and_head():
    model = create_model("tv:resnet18", num_classes=4)
    targets = default_target_modules(model)
    assert targets[0] == "body.layer1.0.conv1" and "body.conv1" not in targets  # stem stays frozen
    pm = apply_peft(model, r=4)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_user_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="unknown torchvision model 'resnet19'.*resnet18"):
        create_model("tv:resnet19", num_classes=3)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached: the download is attempted and fails
    with pytest.raises(UserError, match="could not download torchvision weights"):
        create_model("tv:resnet18", num_classes=3, pretrained=True)
    with pytest.raises(UserError, match="drop_path_rate"):
        create_model("tv:resnet18", num_classes=3, drop_path_rate=0.1)


def test_googlenet_trains_and_swin_weights_load(tmp_path):
    from torchvision import models

    g = create_model("tv:googlenet", num_classes=3).train()  # train mode returns (logits, aux) inside the body
    assert g(_x()).shape == (2, 3)
    torch.manual_seed(0)
    swin = models.swin_t(num_classes=5).eval()  # its classifier is called `head`, like the wrapper's
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(path))
    model = create_model("tv:swin_t", num_classes=None, weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), swin(_x()), rtol=0, atol=0)
