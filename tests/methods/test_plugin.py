"""PIM's pieces against hand computations: the selector's top-k, the FPN's top-down sum, the graph combiner."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from fgclf.methods import StepContext, create_method
from fgclf.methods.plugin import FPN, GraphCombiner, select_tokens


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
