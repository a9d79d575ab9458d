"""LoRA on a timm ViT and a timm ResNet under 2 gloo processes: adapter reload and merged export agree."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_ARGS, run_script


@pytest.mark.parametrize("name,kwargs", [("test_vit", '{"img_size": 32}'),
                                         pytest.param("test_resnet", "{}", marks=pytest.mark.slow)])
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


@pytest.mark.slow
def test_lora_last_checkpoint_holds_only_trained_weights_and_resumes_exactly(toy_root, tmp_path):
    """last/ of a LoRA run leaves the frozen base out; kill + resume equals the uninterrupted run,
    and a resume onto other base weights is refused."""
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from conftest import last_error_line

    base = tmp_path / "base.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(base))

    def train(out, *extra, env=None):
        args = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--model.name", "test_resnet",
                "--model.weights", str(base), "--peft", "lora", "--train.epochs", "3", "--optim.lr", "0.01",
                "--train.output_dir", str(out), *extra]
        return run_script("train_classifier.py", args, env=env)

    ref = train(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    with safe_open(str(tmp_path / "ref/checkpoints/last/state/model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    frozen = json.loads((tmp_path / "ref/checkpoints/last/frozen.json").read_text())
    assert saved and all("lora_" in k or "modules_to_save" in k or "running_" in k or "num_batches" in k
                         for k in saved), sorted(saved)[:5]
    assert frozen["parameters"] > 0 and not any(k.endswith("base_layer.weight") for k in saved)
    cut = tmp_path / "cut"
    killed = train(cut, env={"FGCLF_DEBUG_KILL_AT_STEP": "6"})  # 4 updates per epoch: inside epoch 2
    assert killed.returncode != 0
    resumed = train(cut, "--resume", "last")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", cut))
    for key in ("top1", "f1_macro", "auroc_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    np.testing.assert_allclose(np.load(tmp_path / "ref/predictions.npz")["logits"],
                               np.load(cut / "predictions.npz")["logits"], atol=1e-5)
    # other base weights under the same path: the trained adapter must not be loaded onto them
    killed = train(tmp_path / "cut2", env={"FGCLF_DEBUG_KILL_AT_STEP": "6"})
    assert killed.returncode != 0
    torch.manual_seed(5)
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(base))
    refused = train(tmp_path / "cut2", "--resume", "last")
    assert refused.returncode != 0
    assert "frozen base weights differ" in last_error_line(refused)
