"""Multi-view test-time augmentation: the views are the named crops, the prediction is the mean
probability over them (a manual loop), and a run evaluates with it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_toy

from fgclf.tta import num_views, tta_logits, views


def test_five_and_ten_crops_are_the_corners_and_the_centre():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    five = views(x, "five_crop")
    assert len(five) == 5 and all(v.shape == x.shape for v in five)
    h = 14  # round(0.875 * 16)
    for v, (t, l) in zip(five, ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))):
        want = F.interpolate(x[..., t:t + h, l:l + h], size=(16, 16), mode="bilinear", align_corners=False,
                             antialias=True)
        torch.testing.assert_close(v, want)
    ten = views(x, "ten_crop")
    assert len(ten) == 10 and all(torch.equal(ten[5 + k], five[k].flip(-1)) for k in range(5))
    multi = views(x, "multiscale")
    assert len(multi) == num_views("multiscale") == 6 and torch.equal(multi[0], x) and torch.equal(multi[1], x.flip(-1))


@pytest.mark.parametrize("mode", ["five_crop", "ten_crop", "multiscale"])
def test_the_prediction_is_the_mean_probability_of_a_manual_loop(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(3, 3, 16, 16)
    H = 16
    manual = []
    if mode == "multiscale":
        for zoom in (1.0, 0.875, 0.75):
            h = round(zoom * H)
            o = (H - h) // 2
            v = x[..., o:o + h, o:o + h]
            v = v if h == H else F.interpolate(v, size=(H, H), mode="bilinear", align_corners=False, antialias=True)
            manual += [v, v.flip(-1)]
    else:
        h = round(0.875 * H)
        for t, l in ((0, 0), (0, H - h), (H - h, 0), (H - h, H - h), ((H - h) // 2, (H - h) // 2)):
            manual.append(F.interpolate(x[..., t:t + h, l:l + h], size=(H, H), mode="bilinear", align_corners=False,
                                        antialias=True))
        if mode == "ten_crop":
            manual += [v.flip(-1) for v in manual]
    want = torch.stack([model(v).softmax(1) for v in manual]).mean(0)
    with torch.no_grad():
        got = tta_logits(model, x, mode)
    torch.testing.assert_close(got.softmax(1), want.detach(), atol=1e-6, rtol=1e-5)


def test_a_run_evaluates_with_ten_crops_and_records_the_cost(toy_root, tmp_path):
    from fgclf.data import create_transform
    from fgclf.data.datasets import load_image
    from fgclf.data import load_records
    from fgclf.models import create_model

    run = tmp_path / "run"
    train_toy(toy_root, run, "--train.epochs", "1", "--train.tta", "ten_crop")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tta"] == "ten_crop" and metrics["tta_views"] == 10 and metrics["test_seconds"] > 0
    best = run / "checkpoints" / "best"
    meta = json.loads((best / "config.json").read_text())
    model = create_model(f"file:{best}", num_classes=meta["num_classes"]).eval()
    rec = load_records(format="cub", root=str(toy_root), val_fraction=0.15)
    path_of = dict(zip(rec.image_ids, rec.items))
    npz = np.load(run / "predictions.npz")
    tf = create_transform(meta["data_config"], is_training=False)
    x = torch.stack([tf(load_image(path_of[i])) for i in npz["image_ids"]])
    with torch.no_grad():
        probs = torch.stack([model(v).softmax(1) for v in views(x, "ten_crop")]).mean(0).numpy()
    np.testing.assert_allclose(npz["probs"], probs, atol=1e-5)
    # predict.py uses the run's TTA: the same logits (log mean probabilities) as the run's test evaluation
    from conftest import _run_in_process

    proc = _run_in_process("predict.py", ["--model", str(run), "--output", str(tmp_path / "p.csv"), "--save-logits",
                                          "--num-workers", "0", *[path_of[i] for i in npz["image_ids"][:5]]])
    assert proc.returncode == 0 and "ten_crop TTA" in proc.stdout, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.array([r["logits"] for r in rows]), npz["logits"][:5], atol=1e-5)
    # ensemble_eval scores the run's checkpoint with the run's ten crops: its saved logits; the report says so
    import importlib.util
    import sys

    from fgclf.config import DataConfig

    spec = importlib.util.spec_from_file_location("ensemble_eval_script", Path(__file__).parents[1] / "scripts" /
                                                  "ensemble_eval.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    member = script.checkpoint_member(best, DataConfig(format="cub", root=str(toy_root), num_workers=0), 16)
    assert member.tta == "ten_crop"
    np.testing.assert_allclose(member.logits, npz["logits"], atol=1e-5)
    from fgclf.ensemble import evaluate_ensemble, format_report, load_run_member

    member.name = "as_checkpoint"
    report = format_report(evaluate_ensemble([load_run_member(run, name="as_run"), member], methods=["mean_prob"]))
    assert report.count("| ten_crop |") == 2
