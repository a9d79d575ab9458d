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


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_mambaout"])
def test_grad_cam_is_the_grad_cam_packages(name):
    """fgclf's own Grad-CAM (the report's and explain.py's default) gives jacobgil/pytorch-grad-cam's
    GradCAM maps on the same layer: BatchNorm CNN, ViT tokens on the grid, channels-last stages;
    a batch asking for different classes (one per image, two images sharing one), at 72 px for the CNNs."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from fgclf.explain import grad_cam

    torch.manual_seed(0)
    size = 32 if name == "test_vit" else 72
    model = timm.create_model(name, num_classes=5, **({"img_size": 32} if name == "test_vit" else {})).eval()
    x = torch.randn(4, 3, size, size)
    classes = [0, 3, 3, 1]
    layer, reshape = target_layer(model)
    ours = grad_cam(model, x, classes, layer, reshape)
    assert all(p.grad is None for p in model.parameters())  # the gradient stops at the layer
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    assert ours.shape == theirs.shape == (4, size, size)
    assert ours.max() > 0.99 and len({m.tobytes() for m in ours}) == 4  # real maps, not a constant
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_report_maps_import_neither_grad_cam_nor_sklearn():
    """A run's report draws Grad-CAM without the grad-cam package's import, which pulls in scikit-learn
    (the report row of bench/fixed_cost.py fell from 1.57 to 0.97 s with it)."""
    import subprocess
    import sys

    code = ("import sys, timm, torch\nfrom fgclf.explain import class_maps\n"
            "m = timm.create_model('test_resnet', num_classes=3).eval()\n"
            "maps = class_maps(m, torch.rand(2, 3, 64, 64), [0, 2])\n"
            "assert maps.shape == (2, 64, 64), maps.shape\n"
            "print(sorted(k for k in ('sklearn', 'pytorch_grad_cam') if k in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_grad_cam_of_images_made_in_inference_mode_and_a_layer_that_does_not_run():
    from fgclf.errors import UserError
    from fgclf.explain import grad_cam

    model = RegionNet().eval()
    with torch.inference_mode():
        x = torch.rand(2, 3, 32, 32)  # an inference tensor, as a predict loop would hand over
    assert grad_cam(model, x, [0, 1], model.conv).shape == (2, 32, 32)
    with torch.inference_mode(), pytest.raises(UserError, match="outside torch.inference_mode"):
        grad_cam(model, x, [0, 1], model.conv)
    with pytest.raises(UserError, match=r"the map's layer \(Linear\) gave no tensor .*it did not run"):
        grad_cam(model, x, [0, 1], nn.Linear(2, 2))


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


def _reference_rollout(vit, x, head_fusion):
    """Abnar & Zuidema's rollout by hand, from the probabilities timm's unfused attention computes
    (read at ``attn_drop``'s input), in float64 numpy."""
    probs = []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, o: probs.append(a[0].double().numpy()))
    with torch.no_grad():
        vit(x)
    n = probs[0].shape[-1]
    out = np.broadcast_to(np.eye(n), (x.shape[0], n, n))
    for p in probs:
        fused = {"mean": p.mean(1), "max": p.max(1), "min": p.min(1)}[head_fusion]
        a = 0.5 * fused + 0.5 * np.eye(n)
        out = (a / a.sum(-1, keepdims=True)) @ out
    return out[:, 0, 1:]


@pytest.mark.parametrize("head_fusion", ["mean", "max"])
def test_attention_rollout_equals_the_formula(head_fusion):
    from fgclf.explain import attention_rollout

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=8).eval()  # 4 x 4 patches
    x = torch.randn(2, 3, 32, 32)
    maps = attention_rollout(vit, x, head_fusion=head_fusion)
    want = _reference_rollout(vit, x, head_fusion).reshape(2, 4, 4)
    assert maps.shape == (2, 32, 32)
    # the map is the class token's row over the 4 x 4 grid, upsampled: its patch centres' order is the grid's
    got = torch.nn.functional.interpolate(torch.from_numpy(want).float()[:, None], size=(32, 32), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    got = (got - got.min((1, 2), keepdims=True)) / (got.max((1, 2), keepdims=True) - got.min((1, 2), keepdims=True))
    np.testing.assert_allclose(maps, got, atol=2e-4)  # float32 against float64, stretched to [0, 1]


def test_attention_rollout_peaks_where_the_class_token_looks():
    """A ViT built so that every query attends to the tokens of the top-left quadrant (their keys are
    large there, from the position embedding alone): the rollout's map lies in that quadrant."""
    from fgclf.explain import attention_rollout

    vit = timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=8).eval()
    dim = vit.embed_dim
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias.zero_()
        vit.cls_token.zero_()
        vit.pos_embed.zero_()
        grid = vit.pos_embed[0, 1:].view(4, 4, dim)
        grid[:2, :2, 0] = 10.0  # the top-left quadrant's tokens carry feature 0
        for blk in vit.blocks:
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
            blk.attn.qkv.weight[dim:2 * dim, 0] = 5.0  # keys read feature 0 (after norm1)
            blk.attn.qkv.bias[:dim] = 1.0  # every query the same: looks for feature 0
    maps = attention_rollout(vit, torch.rand(2, 3, 32, 32))
    assert maps[:, :16, :16].mean() > 3 * maps[:, 16:, 16:].mean() + 1e-6
    row, col = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert row < 16 and col < 16


def test_attention_rollout_refuses_a_cnn():
    from fgclf.errors import UserError
    from fgclf.explain import attention_rollout

    with pytest.raises(UserError, match="attention rollout needs a ViT"):
        attention_rollout(timm.create_model("test_resnet", num_classes=3), torch.rand(1, 3, 32, 32))


def test_script_rollout_of_a_vit_run_and_a_methods_own_maps(toy_root, tmp_path):
    """--cam rollout draws a ViT run's confused images (and refuses a CNN); --cam method writes the
    picture WS-DAN draws (and refuses a method that draws none)."""
    from PIL import Image

    vit = tmp_path / "vit"
    train_toy(toy_root, vit, "--train.epochs", "1", "--model.name", "test_vit", "--model.kwargs", '{"img_size": 32}')
    out = tmp_path / "rollout.png"
    proc = _run_in_process("explain.py", ["--model", str(vit), "--confused", "2", "--cam", "rollout", "--output",
                                          str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollout maps of" in proc.stdout and Image.open(out).size[0] > 200
    proc = _run_in_process("explain.py", ["--model", str(vit), "--confused", "2", "--cam", "method", "--output",
                                          str(tmp_path / "m.png")])
    assert proc.returncode == 2 and "method plain draws no maps of its own" in last_error_line(proc)
    wsdan = tmp_path / "wsdan"
    train_toy(toy_root, wsdan, "--train.epochs", "1", "--method.name", "wsdan", "--method.num_maps", "4")
    image = next((toy_root / "images").rglob("*.jpg"))
    proc = _run_in_process("explain.py", ["--model", str(wsdan), str(image), str(image), "--cam", "method",
                                          "--output", str(tmp_path / "wsdan.png")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wsdan's own maps of 2 images" in proc.stdout and Image.open(tmp_path / "wsdan.png").size[0] > 100
    proc = _run_in_process("explain.py", ["--model", str(wsdan), str(image), "--cam", "rollout", "--output",
                                          str(tmp_path / "r.png")])
    assert proc.returncode == 2 and "attention rollout needs a ViT" in last_error_line(proc)
    assert not (tmp_path / "r.png").exists()


def test_attention_rollout_refuses_attention_it_cannot_recompute():
    """BEiT's attention adds a relative position bias the recomputation would leave out: refused."""
    from timm.models.beit import Beit

    from fgclf.errors import UserError
    from fgclf.explain import attention_rollout

    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(UserError, match="timm.models.beit.Attention"):
        attention_rollout(beit, torch.rand(1, 3, 32, 32))
