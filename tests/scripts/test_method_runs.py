"""Fine-grained methods through ``train_classifier.py``, in runs that look like real ones: a BatchNorm
model, the ``basic`` augmentation preset, 2 loader workers, 64 px (a 2 x 2 feature map).

- WS-DAN stopped by SIGTERM in the middle of epoch 1 and resumed ends exactly where the
  uninterrupted run ends (feature centres, BatchNorm statistics, per-sample crop draws);
- the ``best`` export rebuilds the method (``file:``), so its inference (raw + attention crop)
  reproduces the run's test logits, also from ``ensemble_eval``'s checkpoint members;
- ``--peft lora`` on a B-CNN trains only the adapters and the method's layers, and its merged
  export reproduces the run;
- user errors (unknown method, another method's option, impossible combinations) stop before
  training with one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, _run_in_process, export_logits, last_error_line, run_script

REAL = ["--model.name", "test_efficientnet", "--data.image_size", "64", "--data.num_workers", "2",
        "--data.aug.preset", "basic", "--optim.lr", "0.003", "--train.seed", "5", "--train.epochs", "2"]
WSDAN = ["--method.name", "wsdan", "--method.num_maps", "4"]


def _args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, *REAL, "--train.output_dir", str(out),
            *extra]


def _logits(run: Path) -> np.ndarray:
    return np.load(run / "predictions.npz")["logits"]


@pytest.fixture(scope="module")
def wsdan_runs(toy_root, tmp_path_factory):
    """An uninterrupted WS-DAN run, and one stopped by SIGTERM at update 3 (of 4 per epoch) then resumed."""
    base = tmp_path_factory.mktemp("wsdan")
    whole = _run_in_process("train_classifier.py", _args(toy_root, base / "whole", *WSDAN))
    assert whole.returncode == 0, whole.stderr[-3000:]
    mp = pytest.MonkeyPatch()
    mp.setenv("FGCLF_DEBUG_SIGNAL_AT_STEP", "3:TERM")
    try:
        stopped = _run_in_process("train_classifier.py", _args(toy_root, base / "part", *WSDAN))
    finally:
        mp.undo()
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = _run_in_process("train_classifier.py", _args(toy_root, base / "part", *WSDAN, "--resume", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base / "whole", base / "part"


def test_wsdan_resumed_mid_epoch_equals_the_uninterrupted_run(wsdan_runs):
    whole, part = wsdan_runs
    history = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("train/ce_crop", "train/ce_drop", "train/center", "val/loss"):
        assert resumed[1][key] == pytest.approx(history[1][key], rel=1e-5), key
    np.testing.assert_allclose(_logits(part), _logits(whole), atol=1e-5, rtol=1e-5)
    assert (whole / "wsdan" / "epoch_002.png").is_file()  # the attention picture of each epoch


def test_wsdan_export_and_ensemble_member_reproduce_the_runs_test_logits(wsdan_runs, toy_root):
    whole, _ = wsdan_runs
    config = json.loads((whole / "checkpoints" / "best" / "config.json").read_text())
    assert config["method"]["name"] == "wsdan" and config["method"]["options"]["num_maps"] == 4
    np.testing.assert_allclose(export_logits(whole, toy_root), _logits(whole), atol=1e-4, rtol=1e-4)
    from test_ensemble_eval import _script

    from fgclf.config import DataConfig

    data = DataConfig(format="cub", root=str(toy_root), image_size=64, num_workers=0)
    member = _script().checkpoint_member(whole / "checkpoints" / "best", data, 16, tta_flip=False)
    np.testing.assert_allclose(member.logits, _logits(whole), atol=1e-4, rtol=1e-4)


def test_bcnn_with_lora_trains_adapters_and_its_own_layers_and_exports_merged(toy_root, tmp_path):
    import timm
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"  # "pretrained" base weights that load_adapter_model can find again
    torch.manual_seed(1)
    save_file(timm.create_model("test_efficientnet", num_classes=4).state_dict(), str(base))
    out = tmp_path / "bcnn_lora"
    proc = run_script("train_classifier.py", _args(toy_root, out, "--method.name", "bcnn", "--method.reduce_dim",
                                                   "8", "--peft", "lora", "--train.epochs", "1",
                                                   "--model.weights", str(base)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = json.loads((out / "metrics.json").read_text())["parameters"]
    backbone = sum(p.numel() for p in timm.create_model("test_efficientnet", num_classes=0).parameters())
    assert params["trainable"] < params["total"] - backbone / 2  # the backbone stays frozen
    adapter = (out / "checkpoints" / "best" / "adapter_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as f:
        keys = list(f.keys())
    assert any("lora_" in k for k in keys) and any("fg_reduce" in k for k in keys) and any("fg_head" in k for k in keys)
    np.testing.assert_allclose(export_logits(out, toy_root), _logits(out), atol=1e-4, rtol=1e-4)
    # the adapter re-applied to the recorded base (the method's model rebuilt around it) gives the same logits
    from conftest import export_model_and_test_images

    from fgclf.checkpoint import load_adapter_model

    _, images = export_model_and_test_images(out, toy_root)
    with torch.no_grad():
        adapter_logits = load_adapter_model(out / "checkpoints" / "best")(images).numpy()
    np.testing.assert_allclose(adapter_logits, _logits(out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra,message", [
    (["--method.name", "wsdn"], "unknown method 'wsdn'; did you mean: wsdan"),
    (["--method.name", "bcnn", "--method.num_maps", "8"], "method.num_maps is an option of cal, wsdan, not of method bcnn"),
    (["--method.name", "wsdan", "--mixup.alpha", "0.2"], "method wsdan needs hard labels"),
    (["--method.name", "bcnn", "--parallel", "pipeline"], "method bcnn needs --parallel data"),
    (["--loss.confusion", "pairwise", "--parallel", "pipeline"], "does not support mixup, loss.regularizer, "
                                                                  "loss.confusion or train.tta(_flip)"),
    (["--loss.confusion", "pairs"], "loss.confusion"),
    (["--loss.confusion", "pairwise"], "loss.confusion and loss.confusion_weight go together"),
    (["--method.name", "api_net", "--train.batch_size", "32"], "8 classes per batch, but the train split has 4"),
    (["--method.name", "pmg", "--train.grad_accum_steps", "2"], "method pmg takes 4 optimizer steps per batch"),
    (["--method.name", "api_net", "--method.samples_per_class", "3"], "must be a multiple of method.samples_per_class 3"),
])
def test_method_user_errors_stop_before_training(toy_root, tmp_path, extra, message):
    proc = run_script("train_classifier.py", _args(toy_root, tmp_path / "run", *extra))
    assert proc.returncode == 2 and message in last_error_line(proc), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_export_of_another_method_is_refused(wsdan_runs, toy_root, tmp_path):
    whole, _ = wsdan_runs
    proc = run_script("train_classifier.py", _args(toy_root, tmp_path / "run", "--model.name",
                                                   f"file:{whole / 'checkpoints' / 'best'}", "--method.name", "bcnn"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "was trained with method wsdan; continue it with --method.name wsdan" in last_error_line(proc)
    proc = run_script("train_classifier.py", _args(toy_root, tmp_path / "run2", "--model.name",
                                                   f"file:{whole / 'checkpoints' / 'best'}", *WSDAN[:2],
                                                   "--method.num_maps", "8"))
    assert proc.returncode == 2 and "method.num_maps 8 differs from the export's 4" in last_error_line(proc)
