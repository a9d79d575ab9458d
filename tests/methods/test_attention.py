"""WS-DAN / CAL pieces against hand computations: crop boxes, drop masks, map sampling, centres, CAL's effect."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from fgclf.methods import StepContext, create_method
from fgclf.methods.attention import AttentionModel, attention_crop, crop_boxes, drop_mask, pick_maps


def _one_hot_map(h: int, w: int, cells: list[tuple[int, int, float]]) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    for y, x, v in cells:
        m[0, y, x] = v
    return m


def test_crop_box_of_a_hand_made_map_equals_the_hand_computed_box():
    # at the image's own resolution the upsampling is the identity: the box is where the map >= theta * max
    att = _one_hot_map(20, 30, [(5, 7, 1.0), (12, 20, 0.6), (15, 3, 0.3)])
    box = crop_boxes(att, torch.tensor([0.5]), padding=0.0, size=(20, 30))
    assert box.tolist() == [[5, 13, 7, 21]]  # rows 5..12, columns 7..20 (end exclusive)
    box = crop_boxes(att, torch.tensor([0.25]), padding=0.1, size=(20, 30))
    # rows 5..15 -> padded by int(0.1 * 20) = 2 -> 3..17; columns 3..20 -> padded by 3 -> 0..23
    assert box.tolist() == [[3, 18, 0, 24]]


def test_crop_box_upsamples_with_aligned_corners():
    att = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # top-right cell of a 2x2 map
    box = crop_boxes(att, torch.tensor([0.5]), padding=0.0, size=(5, 5)).tolist()[0]
    up = F.interpolate(att[:, None], size=(5, 5), mode="bilinear", align_corners=True)[0, 0].numpy()
    rows, cols = np.nonzero(up >= 0.5)
    assert box == [rows.min(), rows.max() + 1, cols.min(), cols.max() + 1] == [0, 3, 2, 5]


def test_attention_crop_resizes_the_box_to_the_input_size():
    images = torch.randn(1, 3, 20, 30)
    att = _one_hot_map(20, 30, [(5, 7, 1.0), (12, 20, 0.6)])
    crop = attention_crop(images, att, torch.tensor([0.5]), padding=0.0)
    expected = F.interpolate(images[:, :, 5:13, 7:21], size=(20, 30), mode="bilinear", align_corners=True)
    torch.testing.assert_close(crop, expected)


def test_drop_mask_removes_exactly_the_thresholded_region():
    att = torch.rand(2, 12, 16, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor([0.3, 0.7])
    mask = drop_mask(att, theta, size=(12, 16))
    for i in range(2):
        expected = (att[i] < theta[i] * att[i].max()).float()
        torch.testing.assert_close(mask[i, 0], expected)


def test_maps_are_picked_with_probability_proportional_to_sqrt_of_their_mean():
    means = torch.tensor([1.0, 4.0, 0.0, 9.0])
    att = means[None, :, None, None].expand(2000, 4, 3, 3).clone()
    u = (torch.arange(2000) + 0.5) / 2000  # an even grid over [0, 1): frequencies are the probabilities
    picked = pick_maps(att, u)[:, 0, 0]
    freq = torch.stack([(picked == m).float().mean() for m in means])
    expected = torch.sqrt(means + 1e-12) / torch.sqrt(means + 1e-12).sum()
    torch.testing.assert_close(freq, expected, atol=2e-3, rtol=0)


def _wsdan(name: str = "wsdan", classes: int = 3, **options) -> AttentionModel:
    torch.manual_seed(0)
    return create_method(name, num_maps=4, **options).build(timm.create_model("resnet18", num_classes=classes), classes)


def test_feature_centres_move_by_the_official_rule_summing_duplicates():
    method = create_method("wsdan", num_maps=4, beta=0.05)
    model = _wsdan()
    centres = torch.randn(3, model.num_features)
    model.feature_center.copy_(centres)
    features = F.normalize(torch.randn(4, model.num_features), dim=1)
    labels = torch.tensor([2, 0, 2, 1])
    loss = method._update_centres(model, features, labels, StepContext())
    normed = F.normalize(centres, dim=1)
    expected = centres.clone()
    for f, y in zip(features, labels):  # TF's scatter_sub: every sample of a class adds its step
        expected[y] += 0.05 * (f - normed[y])
    torch.testing.assert_close(model.feature_center, expected)
    # the loss uses the centres from before the update: mean over samples of ||f - normalize(c_y)||^2
    torch.testing.assert_close(loss, ((features - normed[labels]) ** 2).sum(1).mean())
    # SAM's second pass over the same batch (ctx.replay) gives the same loss and leaves the centres alone
    again = method._update_centres(model, features, labels, StepContext(replay=True))
    torch.testing.assert_close(model.feature_center, expected)
    torch.testing.assert_close(again, ((features - F.normalize(expected, dim=1)[labels]) ** 2).sum(1).mean())


def test_cal_effect_is_zero_when_random_attention_equals_the_learned_one():
    model = _wsdan("cal").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        attention = model.raw(x)["attention"]
        same = model.raw(x, random_attention=lambda *shape: attention / 2)  # the draw is doubled: U(0, 2)
        other = model.raw(x, random_attention=lambda *shape: torch.rand(*shape))
    torch.testing.assert_close(same["effect"], torch.zeros_like(same["effect"]), atol=1e-5, rtol=0)
    assert other["effect"].abs().max() > 1e-3


@pytest.mark.parametrize("name,crops", [("wsdan", [(0.1, 0.05)]), ("cal", [(0.3, 0.1), (0.2, 0.1), (0.1, 0.05)])])
def test_inference_averages_the_raw_view_and_the_crops_of_the_mean_map(name, crops):
    model = _wsdan(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.raw(x)
        mean_map = raw["attention"].mean(1)
        views = [raw["logits"]] + [model.raw(attention_crop(x, mean_map, torch.full((2,), t), p))["logits"]
                                   for t, p in crops]
        torch.testing.assert_close(model(x), torch.stack(views).mean(0))
        model.train()
        torch.testing.assert_close(model.eval()(x), torch.stack(views).mean(0))


def test_bap_is_the_normalised_signed_sqrt_of_attention_weighted_feature_averages():
    g = torch.Generator().manual_seed(0)
    fmap, att = torch.randn(2, 5, 3, 4, generator=g), torch.rand(2, 3, 3, 4, generator=g)
    out = _wsdan().bap(fmap, att)  # WS-DAN's eps 1e-12
    m = np.einsum("bmhw,bchw->bmc", att.numpy(), fmap.numpy()) / 12
    m = np.sign(m) * np.sqrt(np.abs(m) + 1e-12)
    m = m.reshape(2, -1) / np.linalg.norm(m.reshape(2, -1), axis=1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), m, rtol=1e-5, atol=1e-6)


def test_a_training_step_uses_three_views_and_logs_its_terms():
    method = create_method("wsdan", num_maps=4)
    model = _wsdan().train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    out = method.training_step(model, (x, y), StepContext(seed=1))
    assert set(out.terms) == {"ce_raw", "ce_crop", "ce_drop", "center"}
    expected = (out.terms["ce_raw"] + out.terms["ce_crop"] + out.terms["ce_drop"]) / 3 + out.terms["center"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.logits.shape == (4, 3) and float(model.feature_center.abs().sum()) > 0
    out.loss.backward()
    assert model.fg_attention[0].weight.grad is not None and model.backbone.conv1.weight.grad is not None
