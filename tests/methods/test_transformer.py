"""TransFG against hand computations: overlapping patches, the attention rollout's part choice, the
contrastive loss."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from fgclf.methods import StepContext, create_method
from fgclf.methods.transformer import contrastive_loss, overlap_patches


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=64, **kw).eval()


def test_a_stride_equal_to_the_patch_size_is_the_stock_embedding():
    stock, model = _vit(), _vit()
    overlap_patches(model, 16)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), stock(x))


def test_overlapping_patches_grow_the_grid_and_resample_the_position_embedding():
    model = _vit()
    overlap_patches(model, 12)  # (64 - 16) // 12 + 1 = 5 patches a side
    assert model.patch_embed.grid_size == (5, 5) and model.pos_embed.shape == (1, 1 + 25, model.embed_dim)
    tokens = model.patch_embed(torch.randn(1, 3, 64, 64))  # NHWC for a dynamic_img_size ViT
    assert tokens.reshape(1, -1, model.embed_dim).shape == (1, 25, model.embed_dim)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(Exception, match="slide_step must be in 1..16"):
        overlap_patches(_vit(), 20)


def test_selected_parts_are_the_argmax_of_a_hand_computed_rollout():
    torch.manual_seed(0)
    method = create_method("transfg", slide_step=12)
    model = method.build(timm.create_model("test_vit", num_classes=3, img_size=64), 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        b = model.backbone
        tokens = b.norm_pre(b._pos_embed(b.patch_embed(x)))
        rollout = None
        for blk in b.blocks[:-1]:  # softmax(q k^T / sqrt(d)) of each layer, from its own q and k
            h = blk.norm1(tokens)
            qkv = blk.attn.qkv(h).reshape(2, h.shape[1], 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            probs = (qkv[0] @ qkv[1].transpose(-2, -1) / qkv.shape[-1] ** 0.5).softmax(-1)
            rollout = probs if rollout is None else probs @ rollout
            tokens = blk(tokens)
    expected = rollout[:, :, 0, 1:].argmax(-1)
    assert torch.equal(model.last_parts, expected)


def test_contrastive_loss_equals_a_double_loop():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 1, 0])
    n = f / f.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(6):
        for j in range(6):
            cos = float(n[i] @ n[j])
            total += (1 - cos) if y[i] == y[j] else max(cos - 0.4, 0.0)
    assert float(contrastive_loss(f, y, 0.4)) == pytest.approx(total / 36, rel=1e-6)  # computed in float32


def test_a_training_step_adds_the_contrastive_term():
    torch.manual_seed(0)
    method = create_method("transfg", contrastive_weight=0.5)
    model = method.build(timm.create_model("test_vit", num_classes=3, img_size=64), 3).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    out = method.training_step(model, (x, y), StepContext())
    torch.testing.assert_close(out.loss.detach(), out.terms["ce"] + 0.5 * out.terms["contrastive"])
    with pytest.raises(Exception, match="needs a timm VisionTransformer"):
        method.build(timm.create_model("resnet18", num_classes=3), 3)
