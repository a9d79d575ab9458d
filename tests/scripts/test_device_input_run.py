"""train_classifier.py with --data.decoder nvjpeg, run on the CPU (the device check lifted: the same code,
with decode_jpeg on the CPU): it trains from file bytes, and its test predictions are those of the PIL
eval path up to resampling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IN_PROCESS, last_error_line, run_script

RUN = ["--model.name", "test_efficientnet", "--model.pretrained", "false", "--data.image_size", "32",
       "--data.num_workers", "2", "--train.progress", "false", "--train.batch_size", "8", "--train.epochs", "2"]


@pytest.mark.skipif(not IN_PROCESS, reason="lifts the CUDA check by patching this process (the in-process run)")
def test_gpu_input_path_run_counts_its_images_and_predicts_like_the_pil_path(toy_root, tmp_path, monkeypatch):
    from fgclf import data as fd
    from fgclf.data import device_input
    from fgclf.models import create_model, read_checkpoint_config

    monkeypatch.setattr(device_input, "check_device", lambda device: None)
    out = tmp_path / "run"
    proc = run_script("train_classifier.py", [*RUN, "--data.format", "cub", "--data.root", str(toy_root),
                                              "--data.decoder", "nvjpeg", "--train.output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    decoded = metrics["device_decode"]
    assert decoded["train"] == {"decoded": 2 * (metrics["n_train"] // 8 * 8), "fallbacks": {}}  # last batch dropped
    assert decoded["eval"] == {"decoded": 2 * metrics["n_val"] + metrics["num_samples"], "fallbacks": {}}

    best = out / "checkpoints" / "best"
    meta = read_checkpoint_config(best)
    model = create_model(f"file:{best}", num_classes=meta["num_classes"]).eval()
    tf = fd.create_transform(meta["data_config"], is_training=False)
    records = fd.load_records(format="cub", root=str(toy_root))
    test = fd.create_dataset(records=records, split="test", transform=tf)
    with torch.no_grad():
        pil = torch.cat([model(torch.stack([test[i][0] for i in range(k, min(k + 8, len(test)))]))
                         for k in range(0, len(test), 8)]).softmax(1).numpy()
    saved = np.load(out / "predictions.npz")["probs"]
    assert saved.shape == pil.shape
    assert np.abs(saved - pil).max() < 0.05 and (saved.argmax(1) == pil.argmax(1)).mean() >= 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_input_path_without_cuda_is_one_line_before_the_run(toy_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_classifier.py", [*RUN, "--data.format", "cub", "--data.root", str(toy_root),
                                              "--data.decoder", "nvjpeg", "--train.output_dir", str(out)])
    assert proc.returncode == 2 and "decodes on the GPU" in last_error_line(proc)
    assert not out.exists()



@pytest.mark.parametrize("script,args,message", [
    ("train_classifier.py", ["--data.aug.rotation", "10"], "augmentation rotation needs the CPU path"),
    ("extract_features.py", [], "extract_features.py decodes on the CPU")])
def test_what_the_gpu_path_cannot_do_is_one_line_before_any_work(toy_root, tmp_path, script, args, message):
    out = tmp_path / "run"
    flags = [*RUN, "--train.output_dir", str(out)] if script == "train_classifier.py" else \
        ["--model.name", "test_efficientnet", "--output_dir", str(out)]
    proc = run_script(script, [*flags, "--data.format", "cub", "--data.root", str(toy_root), "--data.decoder",
                               "nvjpeg", *args])
    assert proc.returncode == 2 and message in last_error_line(proc)
    assert not out.exists()
