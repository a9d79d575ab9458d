"""GPU-only checks (run by bench/gpu_check.sh; CI has no GPU and deselects the ``gpu`` marker)."""
from __future__ import annotations

import json

import numpy as np
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


@pytest.mark.parametrize("peft", [False, True])
def test_fsdp2_tests_the_best_epoch_weights(toy_root, tmp_path, peft):
    """FSDP2 shards every parameter (DTensor): the best weights go back in through
    ``set_model_state_dict`` (a plain ``load_state_dict`` cannot fill the shards), so the test logits
    are those of the best epoch (2 of 3 here), the ones its export gives in a plain process."""
    import os
    import subprocess

    import numpy as np
    from conftest import ACCELERATE, REPO, REPO_PYTHONPATH, export_logits

    extra = []
    if peft:  # LoRA on the ResNet's convs: the adapter file's keys are mapped to the model's by PEFT
        import timm
        from safetensors.torch import save_file

        base = tmp_path / "base.safetensors"
        save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(base))
        extra = ["--model.name", "test_resnet", "--model.weights", str(base), "--peft", "lora"]
    out = tmp_path / "fsdp"
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp.yaml"),
           "--num_processes", str(min(2, torch.cuda.device_count())), "--mixed_precision", "no",
           str(REPO / "scripts" / "train_classifier.py"), "--data.format", "cub", "--data.root", str(toy_root),
           *TINY_ARGS, *extra, "--train.epochs", "3", "--data.aug.preset", "none", "--optim.lr", "0.01",
           "--train.early_stopping_metric", "loss", "--train.output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] < metrics["epochs_run"], "the best epoch is the last: this run proves nothing"
    logits = np.load(out / "predictions.npz")["logits"]
    if not peft:
        np.testing.assert_allclose(export_logits(out, toy_root), logits, atol=1e-3)
    else:  # the merged export equals the adapter the run tested with
        from fgclf.checkpoint import load_adapter_model
        from conftest import export_model_and_test_images

        _, x = export_model_and_test_images(out, toy_root)
        with torch.no_grad():
            np.testing.assert_allclose(load_adapter_model(out / "checkpoints/best")(x).numpy(), logits, atol=1e-3)


@pytest.mark.parametrize("method", ["bcnn", "cbp", "isqrt_cov", "wsdan", "cal", "pmg", "nts_net", "pim", "herbs"])
def test_methods_train_in_bf16_on_cuda_and_export(toy_root, tmp_path, method):
    """Each fine-grained method under bf16 autocast on the GPU: finite losses, and its export (fp32,
    CPU) predicts the same classes as the run's bf16 test logits for nearly every image."""
    import math

    import numpy as np
    from conftest import export_logits

    options = {"bcnn": ["--method.reduce_dim", "32"], "cbp": ["--method.sketch_dim", "512"],
               "isqrt_cov": ["--method.reduce_dim", "32"], "wsdan": ["--method.num_maps", "8"],
               "cal": ["--method.num_maps", "8"], "pmg": ["--method.feature_size", "32"],
               "nts_net": ["--method.top_n", "3", "--method.cat_num", "2"], "pim": ["--method.fpn_size", "32"],
               "herbs": ["--method.fpn_size", "32"]}[method]
    out = tmp_path / method
    proc = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
                                              "--data.image_size", "64", "--train.epochs", "2",
                                              "--train.mixed_precision", "bf16", "--method.name", method, *options,
                                              "--train.output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in history)
    logits = np.load(out / "predictions.npz")["logits"]
    agree = (export_logits(out, toy_root).argmax(1) == logits.argmax(1)).mean()
    assert agree >= 0.9, agree


@pytest.mark.parametrize("is_training", [True, False])
def test_nvjpeg_path_on_cuda_equals_it_on_the_cpu(tmp_path, is_training):
    """The GPU input path on CUDA (nvJPEG decode, crops and jitter on the GPU) against the same path on the
    CPU (libjpeg-turbo, the same ops): nvJPEG's IDCT and upsampling may differ from libjpeg's by a few
    levels, so the batches agree to 3 % of the range on average, with the same draws."""
    from PIL import Image

    from fgclf.data.datasets import ImageDataset, Records
    from fgclf.data.device_input import DeviceTransform, EncodedImageDataset, collate_encoded, plan_for
    from fgclf.data.seeds import PerSampleSeeds

    rng = np.random.default_rng(0)
    items = []
    for k in range(8):
        path = tmp_path / f"{k}.jpg"
        base = rng.integers(0, 255, (15, 20, 3), dtype=np.uint8)
        Image.fromarray(np.kron(base, np.ones((25, 25, 1), dtype=np.uint8))).save(path, quality=85)
        items.append(str(path))
    records = Records(items=items, labels=[0] * 8, image_ids=[str(k) for k in range(8)], splits=["train"] * 8,
                      class_names=["a"])
    cfg = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875,
           "interpolation": "bicubic"}
    plan = plan_for(cfg, is_training=is_training)
    ds = EncodedImageDataset(ImageDataset(records), plan)
    ds = PerSampleSeeds(ds, seed=1) if is_training else ds
    batch, _ = collate_encoded([ds[i] for i in range(8)])
    cuda = DeviceTransform(plan, "cuda")(batch).cpu()
    cpu = DeviceTransform(plan, "cpu")(batch)
    assert (cuda - cpu).abs().mul(0.5).mean() < 0.03


def test_nvjpeg_run_on_cuda(toy_root, tmp_path):
    """A run with the GPU input path: every image decoded on the device, test metrics finite."""
    out = tmp_path / "run"
    proc = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
                                              "--train.epochs", "2", "--data.decoder", "nvjpeg",
                                              "--train.output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["device_decode"]["eval"]["fallbacks"] == {} and m["device_decode"]["train"]["decoded"] > 0
    assert np.isfinite(m["loss"])
