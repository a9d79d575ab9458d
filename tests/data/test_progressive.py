"""Progressive resizing (--data.progressive): loader workers (persistent too) crop at the scheduled size
of each epoch, evaluation stays at data.image_size, and a run resumed across a boundary equals the
uninterrupted one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import last_error_line, train_toy

from fgclf.data import PerSampleSeeds, create_dataset, create_transform
from fgclf.data.progressive import ScheduledTransform, parse_progressive
from fgclf.errors import UserError


@pytest.mark.parametrize("spec,message", [("2:32", "must start at epoch 0"), ("0:24,0:32", "must increase"),
                                          ("0:big", "bad entry")])
def test_bad_schedules_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_progressive(spec)


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_crop_at_each_epochs_size(toy_root, persistent):
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875,
              "interpolation": "bilinear"}
    tf = ScheduledTransform(parse_progressive("0:16,1:24,3:32"), lambda s: create_transform(
        {**config, "input_size": (3, s, s)}, is_training=True))
    ds = PerSampleSeeds(create_dataset(format="cub", root=str(toy_root), split="train", transform=tf), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=persistent)
    sizes = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        sizes.append({tuple(x.shape[-2:]) for x, _ in loader})
    assert sizes == [{(16, 16)}, {(24, 24)}, {(24, 24)}, {(32, 32)}]


ARGS = ("--model.name", "test_efficientnet", "--data.num_workers", "2", "--data.aug.preset", "basic",
        "--train.epochs", "2", "--optim.lr", "0.003", "--train.seed", "3", "--data.progressive", "0:24,1:32")


def test_resume_across_a_boundary_equals_the_uninterrupted_run(toy_root, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_toy(toy_root, whole, *ARGS)
    assert [json.loads(x)["train_size"] for x in (whole / "metrics.jsonl").read_text().splitlines()] == [24, 32]
    proc = train_toy(toy_root, cut, *ARGS, check=False, env={"FGCLF_DEBUG_SIGNAL_AT_STEP": "3"})
    assert proc.returncode != 0 and "stopped by SIGTERM at epoch 1" in proc.stderr, proc.stderr[-2000:]
    train_toy(toy_root, cut, *ARGS, "--resume", "last")
    np.testing.assert_allclose(np.load(cut / "predictions.npz")["logits"], np.load(whole / "predictions.npz")["logits"],
                               atol=1e-6)
    proc = train_toy(toy_root, tmp_path / "vit", "--data.progressive", "0:24,1:32", "--model.name", "test_vit",
                     "--model.kwargs", '{"img_size": 32}', check=False)
    assert proc.returncode == 2 and "size 24 is not a multiple" in last_error_line(proc)


@pytest.mark.parametrize("extra,message", [
    (("--data.progressive", "0:24,1:48"), "size 48 is above the evaluation size 32"),
    (("--data.progressive", "0:24,1:32", "--method.name", "pim"), "method pim is built for one image size")])
def test_schedules_the_run_cannot_take_are_refused(toy_root, tmp_path, extra, message):
    proc = train_toy(toy_root, tmp_path / "x", *extra, check=False)
    assert proc.returncode == 2 and message in last_error_line(proc)
    assert not (tmp_path / "x").exists()
