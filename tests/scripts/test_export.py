"""scripts/export.py: each format reproduces the run's test logits where fgclf is not used to run it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _run_in_process, last_error_line, train_toy

from fgclf.data import create_transform, load_records
from fgclf.data.datasets import load_image


@pytest.fixture(scope="module")
def run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train_toy(toy_root, out, "--train.epochs", "1")
    return out


@pytest.fixture(scope="module")
def test_images(run, toy_root) -> np.ndarray:
    """The run's test images as the model sees them, in the order of predictions.npz."""
    rec = load_records(format="cub", root=str(toy_root), val_fraction=0.15)
    path_of = dict(zip(rec.image_ids, rec.items))
    meta = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    tf = create_transform(meta["data_config"], is_training=False)
    return torch.stack([tf(load_image(path_of[i])) for i in np.load(run / "predictions.npz")["image_ids"]]).numpy()


def _export(run, fmt, out, *extra):
    proc = _run_in_process("export.py", ["--model", str(run), "--format", fmt, "--output", str(out), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "export.json").read_text())


def test_onnx_runs_in_onnxruntime_with_the_runs_logits(run, test_images, tmp_path):
    import onnxruntime as ort

    proc, record = _export(run, "onnx", tmp_path / "onnx")
    assert record["opset"] == 18 and record["max_abs_diff"] <= 1e-4 and "max |logit difference|" in proc.stdout
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": test_images})[0]  # all test images: a batch size never traced
    np.testing.assert_allclose(logits, np.load(run / "predictions.npz")["logits"], atol=1e-4)
    assert record["class_names"] == [str(n) for n in np.load(run / "predictions.npz")["class_names"]]


def test_torchscript_reproduces_the_runs_logits(run, test_images, tmp_path):
    _, record = _export(run, "torchscript", tmp_path / "ts")
    module = torch.jit.load(str(tmp_path / "ts" / "model.torchscript.pt"))
    with torch.no_grad():
        logits = module(torch.from_numpy(test_images)).numpy()
    np.testing.assert_allclose(logits, np.load(run / "predictions.npz")["logits"], atol=1e-4)


def test_timm_checkpoint_loads_with_timm_alone(run, test_images, tmp_path):
    _, record = _export(run, "timm", tmp_path / "timm")
    np.save(tmp_path / "x.npy", test_images)
    code = f"""
import sys, json, numpy as np, timm, torch
model = timm.create_model("local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
with torch.no_grad():
    np.save({str(tmp_path / 'y.npy')!r}, model(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).numpy())
print(model.pretrained_cfg["label_names"][:2], "fgclf" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [str(n) for n in np.load(run / "predictions.npz")["class_names"]]
    assert proc.stdout.strip() == f"{names[:2]} False"  # the class names came along; fgclf was never imported
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.load(run / "predictions.npz")["logits"], atol=1e-5)
    assert record["architecture"] == "test_efficientnet_gn"


@pytest.fixture(scope="module")
def bcnn_run(toy_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export_bcnn") / "bcnn"
    train_toy(toy_root, run, "--train.epochs", "1", "--method.name", "bcnn", "--method.reduce_dim", "8")
    return run


def test_formats_a_method_model_cannot_take_are_refused(bcnn_run, tmp_path):
    run = bcnn_run
    proc = _run_in_process("export.py", ["--model", str(run), "--format", "timm", "--output", str(tmp_path / "t")])
    assert proc.returncode == 2 and "this model is method bcnn" in last_error_line(proc)
    assert not (tmp_path / "t").exists()
    # a method model without data-dependent steps traces: TorchScript of B-CNN matches
    _, record = _export(run, "torchscript", tmp_path / "ts")
    assert record["max_abs_diff"] <= 1e-4 and record["method"]["name"] == "bcnn"


def test_user_errors(run, tmp_path):
    for args, message in ((["--format", "zip"], "invalid choice"),
                          (["--format", "onnx", "--model", str(tmp_path / "none")], "no such run directory")):
        full = ["--model", str(run), "--output", str(tmp_path / "o"), *args]
        proc = _run_in_process("export.py", full)
        assert proc.returncode == 2 and message in last_error_line(proc)


def test_hub_folder_with_a_model_card_and_the_seeds_interval(toy_root, tmp_path):
    """A sweep-like variant/seed<S> layout: the card gives this run's top-1 and the mean and t-interval
    over its seeds; the folder holds timm's files."""
    import yaml

    from fgclf.stats import summarize

    sweep = tmp_path / "sweep" / "plain"
    for seed in (1, 2):
        train_toy(toy_root, sweep / f"seed{seed}", "--train.epochs", "1", "--train.seed", str(seed))
    _, record = _export(sweep / "seed1", "hub", tmp_path / "hub")
    card = (tmp_path / "hub" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-classification"
    tops = [json.loads((sweep / f"seed{s}" / "metrics.json").read_text())["top1"] for s in (1, 2)]
    want = summarize(tops)
    assert f"| top1 | {tops[0]:.4f} | {want['mean']:.4f} [{want['ci_lo']:.4f}, {want['ci_hi']:.4f}], n = 2 |" in card
    assert "## Intended use and limits" in card and "```yaml" in card
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "config.json", "export.json",
                                                                     "model.safetensors"]


def test_hub_folder_of_a_method_model_is_the_fgclf_export(bcnn_run, tmp_path):
    from fgclf.models import create_model

    _, record = _export(bcnn_run, "hub", tmp_path / "hub")
    assert "create_model('file:" in (tmp_path / "hub" / "README.md").read_text()
    model = create_model(f"file:{tmp_path / 'hub'}", num_classes=4)
    assert type(model).__name__ != "EfficientNet"  # the method's model, rebuilt
    # the run's TTA travels with the export, so predict.py uses it outside the run directory
    from fgclf.predict import resolve_checkpoint

    assert json.loads((tmp_path / "hub" / "config.json").read_text())["tta_flip"] is False
    assert resolve_checkpoint(tmp_path / "hub").tta_flip is False


def test_push_to_hub_is_refused_offline_and_uploads_the_folder_online(run, tmp_path, monkeypatch):
    import huggingface_hub

    args = ["--model", str(run), "--format", "hub", "--output", str(tmp_path / "hub"), "--push-to-hub", "me/birds"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    proc = _run_in_process("export.py", args)
    assert proc.returncode == 2 and "the hub is offline" in last_error_line(proc)
    assert not (tmp_path / "hub").exists()  # refused before any export work
    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    proc = _run_in_process("export.py", args)
    assert proc.returncode == 2 and "needs a token" in last_error_line(proc)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    proc = _run_in_process("export.py", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert calls == [("create", "me/birds"), ("upload", "me/birds", str(tmp_path / "hub"))]


class FixedBatch(torch.nn.Module):
    """Reads its batch size as a Python int: a trace bakes the traced batch size in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))


@pytest.mark.parametrize("fmt", ["onnx_dynamo", "onnx_torchscript", "torchscript"])
def test_an_export_that_does_not_reproduce_the_model_is_removed(tmp_path, fmt):
    """The check runs a batch of another size: a baked-in batch size fails it (or the exporter refuses
    the model); either way one UserError and no file left behind."""
    from fgclf.errors import UserError
    from fgclf.export import export_onnx, export_torchscript

    model, config = FixedBatch().eval(), {"data_config": {"input_size": (3, 8, 8)}}
    with pytest.raises(UserError) as err:
        if fmt == "torchscript":
            export_torchscript(model, config, tmp_path / "m.pt")
        else:
            export_onnx(model, config, tmp_path / "m.onnx", exporter=fmt.split("_")[1])
    assert "\n" not in str(err.value) and ("does not reproduce the model" in str(err.value)
                                           or "ONNX export failed" in str(err.value))
    assert list(tmp_path.iterdir()) == []


def test_onnx_is_one_self_contained_file(run, tmp_path):
    _export(run, "onnx", tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["export.json", "model.onnx"]


def test_adapter_export_rebuilds_with_timm_and_peft_alone(toy_root, tmp_path):
    """A LoRA run exported as its adapter + a reference to the base weights: timm and peft, without
    fgclf, rebuild the run's test logits; predict.py takes the folder as --model too; a run without an
    adapter is refused with one line."""
    import timm
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"  # "pretrained" base weights on disk that the reference names
    torch.manual_seed(3)
    save_file(timm.create_model("test_efficientnet_gn", num_classes=0).state_dict(), str(base))
    run = tmp_path / "lora"
    train_toy(toy_root, run, "--train.epochs", "1", "--peft", "lora", "--model.weights", str(base),
              "--optim.lr", "0.01")
    _, record = _export(run, "adapter", tmp_path / "adapter")
    folder = tmp_path / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                        "config.json", "export.json"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert record["adapter_bytes"] < (run / "checkpoints" / "best" / "model.safetensors").stat().st_size / 2
    code = (folder / "README.md").read_text().split("```python\n")[1].split("```")[0]  # the card's own code
    saved = np.load(run / "predictions.npz")
    rec = load_records(format="cub", root=str(toy_root), val_fraction=0.15)
    path_of = dict(zip(rec.image_ids, rec.items))
    meta = json.loads((folder / "config.json").read_text())
    tf = create_transform(meta["data_config"], is_training=False)
    np.save(tmp_path / "x.npy", torch.stack([tf(load_image(path_of[i])) for i in saved["image_ids"]]).numpy())
    script = code + f"""
import sys, numpy as np, torch
with torch.no_grad():
    np.save({str(tmp_path / 'y.npy')!r}, model(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).numpy())
print(type(model).__name__, "fgclf" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "PeftModel False"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), saved["logits"], atol=1e-4)
    # predict.py on the adapter folder: the base rebuilt from the reference, the adapter merged in
    proc = _run_in_process("predict.py", ["--model", str(folder), "--output", str(tmp_path / "pred.csv"),
                                          *[path_of[i] for i in saved["image_ids"][:4]], "--save-logits",
                                          "--tta-flip", "false", "--num-workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.array([r["logits"] for r in rows]), saved["logits"][:4], atol=1e-4)


def test_adapter_export_of_a_run_without_peft_is_refused(run, tmp_path):
    proc = _run_in_process("export.py", ["--model", str(run), "--format", "adapter", "--output", str(tmp_path / "a")])
    assert proc.returncode == 2 and "was not trained with --peft" in last_error_line(proc)
    assert not (tmp_path / "a").exists()
