"""LoRA on a timm ViT and a timm ResNet under 2 gloo processes: adapter reload and merged export agree."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_ARGS, run_script


@pytest.mark.parametrize("name,kwargs", [("test_vit", '{"img_size": 32}'), ("test_resnet", "{}")])
def test_lora_two_processes_adapter_reload_and_merged_export(toy_root, tmp_path, name, kwargs):
    import timm
    import torch
    from safetensors.torch import save_file

    from fgclf.checkpoint import load_adapter_model
    from fgclf.data import create_dataset, create_transform
    from fgclf.models import create_model

    # a fixed "pretrained" base on disk, so the adapter can be re-applied to the same weights
    base = tmp_path / "base.safetensors"
    save_file(timm.create_model(name, num_classes=0, **json.loads(kwargs)).state_dict(), str(base))
    args = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--model.name", name,
            "--model.weights", str(base), "--model.kwargs", kwargs, "--peft", "lora", "--train.epochs", "1",
            "--optim.lr", "0.01", "--train.output_dir", str(tmp_path / "run")]
    proc = run_script("train_classifier.py", args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    best = run / "checkpoints" / "best"
    meta = json.loads((best / "config.json").read_text())
    ds = create_dataset(format="cub", root=str(toy_root), split="test", val_fraction=0.15,
                        transform=create_transform(meta["data_config"], is_training=False))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        adapter_logits = load_adapter_model(best)(x).numpy()
        merged_logits = create_model(f"file:{best}", num_classes=meta["num_classes"]).eval()(x).numpy()
    np.testing.assert_allclose(merged_logits, adapter_logits, atol=1e-5)
    saved = np.load(run / "predictions.npz")
    np.testing.assert_allclose(adapter_logits, saved["logits"], atol=1e-4)  # same test metrics as the run
    assert (adapter_logits.argmax(1) == saved["logits"].argmax(1)).all()
    adapter_bytes = (best / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (best / "model.safetensors").stat().st_size  # the adapter is the small part
