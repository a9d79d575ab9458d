"""NTS-Net against the official code's pieces, re-implemented here in numpy: anchors, hard NMS and the
ranking loss."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from fgclf.methods import StepContext, create_method
from fgclf.methods.parts import anchors, ranking_loss, select_proposals

SETTINGS = ((32, 48, (2 ** (1 / 3), 2 ** (2 / 3))), (64, 96, (2 ** (1 / 3), 2 ** (2 / 3))),
            (128, 192, (1, 2 ** (1 / 3), 2 ** (2 / 3))))


def _official_anchors(size=448):
    """core/anchors.py generate_default_anchor_maps: edge anchors (y0, x0, y1, x1)."""
    edges = []
    for stride, base, scales in SETTINGS:
        n = int(np.ceil(size / stride))
        oy = np.arange(stride / 2, stride / 2 + stride * n, stride).reshape(n, 1) * np.ones((1, n))
        ox = np.arange(stride / 2, stride / 2 + stride * n, stride).reshape(1, n) * np.ones((n, 1))
        for s in scales:
            for r in (0.667, 1, 1.5):
                h, w = base * s / r ** 0.5, base * s * r ** 0.5
                edges.append(np.stack([oy - h / 2, ox - w / 2, oy + h / 2, ox + w / 2], -1).reshape(-1, 4))
    return np.concatenate(edges)


def test_anchors_at_448_equal_the_official_ones():
    ours = anchors((448, 448), [(14, 14), (7, 7), (4, 4)]).numpy()  # ResNet-50's 14 x 14 map and the navigator's
    official = _official_anchors()
    assert ours.shape == official.shape == (6 * 196 + 6 * 49 + 9 * 16, 4)
    np.testing.assert_allclose(ours, official, rtol=1e-5, atol=1e-3)


def _official_hard_nms(scores, boxes, topn, iou_thresh=0.25):
    cdds = np.concatenate([scores[:, None], boxes, np.arange(len(scores))[:, None]], 1)
    cdds = cdds[np.argsort(cdds[:, 0])]
    out, res = [], cdds
    while res.any():
        cdd = res[-1]
        out.append(int(cdd[-1]))
        if len(out) == topn:
            break
        res = res[:-1]
        start, end = np.maximum(res[:, 1:3], cdd[1:3]), np.minimum(res[:, 3:5], cdd[3:5])
        lengths = end - start
        inter = lengths[:, 0] * lengths[:, 1]
        inter[np.logical_or(lengths[:, 0] < 0, lengths[:, 1] < 0)] = 0
        iou = inter / ((res[:, 3] - res[:, 1]) * (res[:, 4] - res[:, 2]) + (cdd[3] - cdd[1]) * (cdd[4] - cdd[2]) - inter)
        res = res[iou < iou_thresh]
    return out


def test_proposals_equal_the_official_hard_nms():
    boxes = anchors((448, 448), [(14, 14), (7, 7), (4, 4)])
    scores = torch.randn(3, len(boxes), generator=torch.Generator().manual_seed(0))
    ours = select_proposals(scores, boxes, 6)
    for s, row in zip(scores, ours):
        assert row.tolist() == _official_hard_nms(s.numpy().astype(np.float64), boxes.numpy().astype(np.float64), 6)


def test_ranking_loss_equals_the_official_loop():
    g = torch.Generator().manual_seed(1)
    scores, losses = torch.randn(3, 6, generator=g), torch.rand(3, 6, generator=g)
    total = torch.zeros(())
    for i in range(6):  # core/model.py ranking_loss
        worse = (losses > losses[:, i:i + 1]).float()
        total = total + torch.relu((1 - scores[:, i:i + 1] + scores) * worse).sum()
    torch.testing.assert_close(ranking_loss(scores, losses), total / 3)


def test_a_step_sums_raw_concat_part_and_ranking_losses_and_predicts_with_the_scrutinizer():
    torch.manual_seed(0)
    method = create_method("nts_net")
    model = method.build(timm.create_model("resnet18", num_classes=3), 3)
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([0, 2])
    out = method.training_step(model.train(), (x, y), StepContext())
    t = out.terms
    torch.testing.assert_close(out.loss.detach(), t["raw"] + t["concat"] + t["partcls"] + t["rank"])
    model.eval()
    with torch.no_grad():
        parts = model(x, return_parts=True)
        torch.testing.assert_close(model(x), parts["logits"])
    assert model.last_boxes.shape == (2, 6, 4)
    with pytest.raises(Exception, match="cat_num must be in 1..top_n"):
        create_method("nts_net", cat_num=7).build(timm.create_model("resnet18", num_classes=3), 3)
