"""GPU-only checks (run by bench/gpu_check.sh; CI has no GPU and deselects the ``gpu`` marker)."""
from __future__ import annotations

import json

import pytest
from conftest import TINY_ARGS, run_script

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_matches_fp32(toy_root, tmp_path, precision):
    """Autocast training on the GPU lands within a few points of the fp32 run (same seed, data)."""
    base = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--train.epochs", "3",
            "--data.aug.preset", "none", "--optim.lr", "0.01"]
    ref = run_script("train_classifier.py", [*base, "--train.output_dir", str(tmp_path / "fp32"),
                                             "--train.mixed_precision", "no"])
    amp = run_script("train_classifier.py", [*base, "--train.output_dir", str(tmp_path / precision),
                                             "--train.mixed_precision", precision])
    assert ref.returncode == 0 and amp.returncode == 0, amp.stderr[-3000:]
    a = json.loads((tmp_path / "fp32" / "metrics.json").read_text())
    b = json.loads((tmp_path / precision / "metrics.json").read_text())
    cfg = (tmp_path / precision / "config.yaml").read_text()
    assert f"mixed_precision: {precision}" in cfg and "cuda" in cfg
    assert b["num_samples"] == a["num_samples"]
    assert abs(a["loss"] - b["loss"]) < 0.05 * max(1.0, a["loss"])


@pytest.mark.parametrize("name,batch", [("resnet18", 16), ("resnet18", 64), ("vit_tiny_patch16_224", 16),
                                        ("vit_tiny_patch16_224", 64)])
def test_cuda_memory_estimate_within_25_percent(name, batch):
    """The training-memory estimate against torch.cuda.max_memory_allocated of real steps."""
    from fgclf.models import create_model, format_memory, measure_training_memory

    torch.manual_seed(0)
    model = create_model(name, num_classes=200).cuda()
    result = measure_training_memory(model, input_size=(3, 224, 224), batch_size=batch)
    assert result["device"].startswith("cuda")
    assert 0.75 <= result["ratio"] <= 1.25, format_memory(result["estimate"], result)
