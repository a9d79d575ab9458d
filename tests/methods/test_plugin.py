"""PIM's and HERBS' pieces against hand computations: the selectors, the FPN's two paths, the graph
combiner, the refinement loss and its temperature, the losses' weights; PIM switched off is plain."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from fgclf.methods import StepContext, create_method
from fgclf.methods.plugin import FPN, BottomUp, GraphCombiner, refinement_loss, select_tokens


def test_the_selector_keeps_exactly_the_most_confident_locations():
    g = torch.Generator().manual_seed(0)
    feats, logits = torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, 5, generator=g) * 3
    kept_f, kept_l, dropped_l = select_tokens(feats, logits, 3)
    for b in range(2):
        confidence = torch.softmax(logits[b], -1).max(-1).values
        order = sorted(range(10), key=lambda i: -float(confidence[i]))
        assert torch.equal(kept_f[b], feats[b, order[:3]]) and torch.equal(kept_l[b], logits[b, order[:3]])
        assert torch.equal(dropped_l[b], logits[b, order[3:]])


def test_fpn_adds_each_stage_to_the_upsampled_deeper_one():
    torch.manual_seed(0)
    fpn = FPN([3, 5], 4)
    maps = [torch.randn(1, 3, 8, 8), torch.randn(1, 5, 4, 4)]
    out = fpn(maps)
    deep = fpn.proj[1](maps[1])
    torch.testing.assert_close(out[1], deep)
    torch.testing.assert_close(out[0], fpn.proj[0](maps[0]) + F.interpolate(deep, size=(8, 8), mode="bilinear"))


def test_graph_combiner_follows_the_official_computation():
    torch.manual_seed(0)
    comb = GraphCombiner(8, 64).eval()
    with torch.no_grad():
        comb.alpha.fill_(0.5)
        x = torch.randn(2, 64, 8)
        h = comb.pool0(x.transpose(1, 2))  # (B, C, joints = 64 // 32)
        q, k = comb.conv_q(h).mean(1), comb.conv_k(h).mean(1)
        adjacency = comb.adj + torch.tanh(q.unsqueeze(-1) - k.unsqueeze(1)) * comb.alpha
        expected = comb.pool1(comb.bn(torch.matmul(comb.conv(h), adjacency))).flatten(1)
        torch.testing.assert_close(comb(x), expected)
    assert comb.adj.shape == (2, 2)


def test_a_step_weights_the_four_losses_as_the_official_config():
    torch.manual_seed(0)
    method = create_method("pim", fpn_size=32, image_size=96)
    model = method.build(timm.create_model("resnet18", num_classes=3), 3)
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 2, 0])
    out = method.training_step(model.train(), (x, y), StepContext())
    t = out.terms
    torch.testing.assert_close(out.loss.detach(), 0.5 * t["layers"] + 5.0 * t["dropped"] + 1.0 * t["combiner"])
    assert model.counts == [128, 32, 8, 2]  # 2/9 of 24x24, 12x12, 6x6, 3x3 locations


def test_with_the_module_switched_off_the_model_is_the_plain_backbone():
    """``module=False``: the backbone's whole body and own pooling (EfficientNet's conv_head, past the
    stages PIM reads) and a linear classifier; with the plain model's classifier copied in, the same logits."""
    import copy

    for arch in ("test_efficientnet", "resnet18"):
        torch.manual_seed(0)
        plain = timm.create_model(arch, num_classes=3).eval()
        model = create_method("pim", module=False, image_size=64).build(copy.deepcopy(plain), 3).eval()
        classifier = plain.get_classifier()
        model.fg_head.load_state_dict(classifier.state_dict())
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        assert not model.unused_backbone_params and list(model.new_modules) == ["fg_head"], arch
        assert not hasattr(model, "fg_fpn"), arch


def test_herbs_selects_by_the_probability_of_the_class_the_stage_predicts():
    g = torch.Generator().manual_seed(1)
    feats, logits = torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, 5, generator=g) * 3
    kept_f, kept_l, dropped_l = select_tokens(feats, logits, 3, by_predicted_class=True)
    top_prob_order = select_tokens(feats, logits, 3)[0]
    for b in range(2):
        predicted = int(logits[b].mean(0).argmax())
        score = torch.softmax(logits[b], -1)[:, predicted]
        order = sorted(range(10), key=lambda i: -float(score[i]))
        assert torch.equal(kept_f[b], feats[b, order[:3]]) and torch.equal(dropped_l[b], logits[b, order[3:]])
    assert not torch.equal(kept_f, top_prob_order)  # the two rules differ on this input


def test_bottom_up_path_adds_each_stage_to_the_next_through_a_map_over_positions():
    torch.manual_seed(0)
    up = BottomUp(4, [16, 4, 1])
    tokens = [torch.randn(2, 16, 4), torch.randn(2, 4, 4), torch.randn(2, 1, 4)]
    out = up(tokens)
    x0 = up.proj[0](tokens[0])
    x1 = up.proj[1](tokens[1]) + torch.einsum("ts,bsc->btc", up.down[0].weight[..., 0], x0) + up.down[0].bias[:, None]
    x2 = up.proj[2](tokens[2]) + torch.einsum("ts,bsc->btc", up.down[1].weight[..., 0], x1) + up.down[1].bias[:, None]
    for got, want in zip(out, (x0, x1, x2)):
        torch.testing.assert_close(got, want)


def test_refinement_is_the_official_kl_at_the_scheduled_temperature():
    g = torch.Generator().manual_seed(2)
    refined = [torch.randn(2, 6, 5, generator=g, requires_grad=True) for _ in range(2)]
    target = [torch.randn(2, 6, 5, generator=g, requires_grad=True) for _ in range(2)]
    t = 8.0
    want = 0.0
    for r, q in zip(refined, target):  # sum p (log p - log softmax(r / T)) over every element, / element count
        p = torch.softmax(q.detach() / t, -1)
        want = want + (p * (p.log() - torch.log_softmax(r.detach() / t, -1))).sum() / p.numel()
    got = refinement_loss(refined, target, t)
    torch.testing.assert_close(got.detach(), want)
    got.backward()
    assert all(q.grad is None for q in target) and all(r.grad.abs().sum() > 0 for r in refined)
    herbs = create_method("herbs")
    assert [herbs.temperature(e) for e in (0, 9, 10, 25)] == [64.0, 64.0, 32.0, 16.0]


def test_a_herbs_step_weights_its_losses_as_the_official_config():
    torch.manual_seed(0)
    method = create_method("herbs", fpn_size=32, image_size=96)
    model = method.build(timm.create_model("resnet18", num_classes=3), 3)
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 2, 0])
    out = method.training_step(model.train(), (x, y), StepContext(epoch=12))
    t = out.terms
    torch.testing.assert_close(out.loss.detach(), 0.3 * t["layers"] + 5.0 * t["dropped"] + 1.0 * t["combiner"]
                               + 1.375 * t["refinement"])
    parts = model(x, return_parts=True)
    torch.testing.assert_close(t["refinement"], refinement_loss(parts["refined"], parts["locations"], 32.0),
                               rtol=1e-4, atol=1e-6)  # BatchNorm in train mode: the same batch, same statistics
    assert model.fg_combiner.pool0.out_features == sum(model.counts) // 64


def test_herbs_refines_the_top_down_logits_towards_the_bottom_up_ones():
    """``refined`` comes from the top-down FPN (before the bottom-up path), ``locations`` (the stage
    loss, the selector, the combiner) from the bottom-up path: changing the bottom-up path changes
    only the latter. At inference the top-down logits are not computed."""
    torch.manual_seed(0)
    model = create_method("herbs", fpn_size=16, image_size=64).build(timm.create_model("resnet18", num_classes=3), 3)
    x = torch.randn(2, 3, 64, 64)
    before = model(x, return_parts=True)
    with torch.no_grad():
        for p in model.fg_fpn_up.parameters():
            p.mul_(3.0)
    after = model(x, return_parts=True)
    for r0, r1 in zip(before["refined"], after["refined"]):
        torch.testing.assert_close(r0, r1)
    assert not torch.allclose(before["locations"][3], after["locations"][3])
    assert "refined" not in model.eval()(x, return_parts=True)


def test_herbs_refuses_a_temperature_it_cannot_schedule():
    import pytest

    from fgclf.errors import UserError

    for options in ({"temperature_halving": 0}, {"temperature": 0.0}):
        with pytest.raises(UserError, match="method.temperature must be > 0 and method.temperature_halving >= 1"):
            create_method("herbs", image_size=64, **options).build(timm.create_model("resnet18", num_classes=3), 3)
