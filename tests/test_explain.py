"""Class activation maps: a model whose logit depends on one image region is explained by that region;
the script draws the run's most confused pairs and chosen images."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import _run_in_process, last_error_line, train_toy
from torch import nn

from fgclf.explain import class_maps, most_confused, target_layer


class RegionNet(nn.Module):
    """Sees only the top-left quadrant of its input (the rest is zeroed before a bias-free conv)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 3)
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., :16, :16] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        feats = torch.relu(self.conv(x * self.mask))
        return self.head(feats.mean((2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++"])
def test_the_map_of_a_one_region_model_lies_in_that_region(method):
    model = RegionNet().eval()
    x = torch.rand(4, 3, 32, 32)
    classes = model(x).argmax(1).tolist()
    maps = class_maps(model, x, classes, method=method, layer=model.conv)
    assert maps.shape == (4, 32, 32)
    for m in maps:  # the 3x3 conv's features up to row/column 16 see the quadrant (0..15); none beyond
        inside, outside = m[:17, :17], np.concatenate([m[17:].ravel(), m[:17, 17:].ravel()])
        row, col = np.unravel_index(m.argmax(), m.shape)
        assert row < 17 and col < 17
        assert inside.mean() > 5 * outside.mean() + 1e-6


def test_vit_and_method_models_get_a_layer():
    vit = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    layer, reshape = target_layer(vit)
    assert layer is vit.blocks[-1].norm1
    maps = class_maps(vit, torch.rand(2, 3, 32, 32), [0, 1])
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    from fgclf.methods import create_method

    bcnn = create_method("bcnn", reduce_dim=8).build(timm.create_model("test_efficientnet", num_classes=3), 3)
    layer, _ = target_layer(bcnn)
    assert any(layer is m for m in bcnn.backbone.modules())


def test_script_draws_confused_pairs_and_chosen_images(toy_root, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    train_toy(toy_root, run, "--train.epochs", "1")
    picks = most_confused(run, 3)
    npz = np.load(run / "predictions.npz")
    for i, t, p in picks:  # the first image of each pair really is that confusion
        assert npz["labels"][i] == t and npz["logits"][i].argmax() == p and t != p
    out = tmp_path / "confused.png"
    proc = _run_in_process("explain.py", ["--model", str(run), "--confused", "3", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out).size[0] > 300 and f"maps of {len(picks)} images" in proc.stdout
    image = next((toy_root / "images").rglob("*.jpg"))
    out2 = tmp_path / "maps.png"
    proc = _run_in_process("explain.py", ["--model", str(run), str(image), "--output", str(out2), "--cam", "finercam"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run_in_process("explain.py", ["--model", str(run), "--output", str(tmp_path / "x.png")])
    assert proc.returncode == 2 and "give images to explain or --confused N" in last_error_line(proc)


class Masked(nn.Module):
    """A timm model (as a method's ``backbone``) that sees only the top-left quadrant of a 128 px image."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = timm.create_model(name, num_classes=3)
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., :64, :64] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.backbone(x * self.mask)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext", "test_mambaout"])
def test_the_chosen_layer_of_timm_models_localises(name):
    """target_layer on real timm families (MambaOut's stages are channels-last, NHWC): the maps of a
    model that sees one quadrant lie there, not in the opposite quadrant."""
    model = Masked(name).eval()
    x = torch.rand(3, 3, 128, 128)
    maps = class_maps(model, x, model(x).argmax(1).tolist())
    assert maps.shape == (3, 128, 128)
    assert maps[:, :64, :64].mean() > 3 * maps[:, 64:, 64:].mean() + 1e-6
