"""Exports of a trained model for use without fgclf (``scripts/export.py``).

* ``onnx``: ``torch.onnx.export`` (the dynamo exporter; ``exporter="torchscript"`` for the older
  tracer) with a dynamic batch axis; the file is then run by onnxruntime on a batch of another
  size and its logits compared with PyTorch's;
* ``torchscript``: ``torch.jit.trace``, reloaded and compared the same way;
* ``timm``: a plain timm checkpoint, ``model.safetensors`` + ``config.json`` in the format timm's
  ``push_to_hub`` writes (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``,
  the class names as ``label_names``), which ``timm.create_model("local-dir:FOLDER",
  pretrained=True)`` loads without fgclf (and the hub, once uploaded, as ``hf-hub:``); only for
  models that are a timm architecture (method ``plain``).

A traced export is only right when the model has no data-dependent steps; the comparison on
other inputs catches the ones that matter (an export whose logits differ by more than
``atol`` is removed and named in a UserError), and ``export.json`` records what was checked.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fgclf.errors import UserError

FORMATS = ("onnx", "torchscript", "timm")
ATOL = 1e-4


def _inputs(config: dict, batch: int, seed: int) -> torch.Tensor:
    size = tuple((config.get("data_config") or {}).get("input_size") or (3, 224, 224))
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def _check(name: str, got: Any, want: torch.Tensor, path: Path, atol: float) -> float:
    import numpy as np

    diff = float(np.abs(np.asarray(got, dtype=np.float64) - want.double().numpy()).max())
    if not diff <= atol:  # nan too
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        raise UserError(f"the {name} export does not reproduce the model (max |logit difference| {diff:.2e} > "
                        f"{atol:g} on a batch of other images); the model has steps tracing cannot capture "
                        "(data-dependent crops or selections): use --format timm or the fgclf export")
    return diff


def export_onnx(model: nn.Module, config: dict, path: Path, *, opset: int = 18, exporter: str = "dynamo",
                atol: float = ATOL) -> dict:
    """Write ``path`` (.onnx) with a dynamic batch axis and check it with onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'fgclf[export]'") from None
    x = _inputs(config, 2, 0)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (x,), str(tmp), dynamo=True, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
        else:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    except UserError:
        raise
    except Exception as err:  # the exporter's own errors: unsupported operators, data-dependent shapes
        tmp.unlink(missing_ok=True)
        raise UserError(f"ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                        "try --onnx-exporter torchscript or --format torchscript") from None
    os.replace(tmp, path)
    check = _inputs(config, 3, 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
    with torch.no_grad():
        diff = _check("ONNX", got, model(check), path, atol)
    return {"file": path.name, "opset": opset, "exporter": exporter, "max_abs_diff": diff,
            "onnxruntime": ort.__version__}


def export_torchscript(model: nn.Module, config: dict, path: Path, *, atol: float = ATOL) -> dict:
    """Write ``path`` (.pt, ``torch.jit.trace``) and check the reloaded module on another batch."""
    x = _inputs(config, 2, 0)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, (x,), check_trace=False)
    except Exception as err:
        raise UserError(f"TorchScript tracing failed ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    tmp = path.with_name(f".{path.name}.partial")
    traced.save(str(tmp))
    os.replace(tmp, path)
    check = _inputs(config, 3, 1)
    with torch.no_grad():
        diff = _check("TorchScript", torch.jit.load(str(path))(check), model(check), path, atol)
    return {"file": path.name, "max_abs_diff": diff}


def timm_architecture(model: nn.Module, config: dict) -> str:
    """The timm architecture name of a plain timm model; a UserError for any other model."""
    method = (config.get("method") or {}).get("name", "plain")
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if method != "plain" or not arch:
        raise UserError(f"--format timm writes a timm architecture's weights; this model is "
                        f"{'method ' + method if method != 'plain' else type(model).__name__}: use --format onnx "
                        "or torchscript, or the fgclf export (checkpoints/best)")
    import timm

    if arch not in timm.list_models():
        raise UserError(f"--format timm: {arch} is not a timm architecture")
    return arch


def export_timm(model: nn.Module, config: dict, folder: Path) -> dict:
    """``folder/model.safetensors`` + ``folder/config.json`` in timm's format."""
    from safetensors.torch import save_file

    from fgclf.utils import atomic_write_json

    arch = timm_architecture(model, config)
    cfg = {k: v for k, v in (model.pretrained_cfg or {}).items() if isinstance(v, (str, int, float, bool, list, tuple,
                                                                                  type(None)))}
    data = config.get("data_config") or {}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
    cfg.update(num_classes=int(config["num_classes"]), label_names=list(config.get("class_names") or []))
    cfg.pop("hf_hub_id", None), cfg.pop("url", None), cfg.pop("file", None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "config.json", {"architecture": arch, "num_classes": int(config["num_classes"]),
                                                "num_features": int(getattr(model, "num_features", 0)),
                                                "model_args": dict(config.get("model_kwargs") or {}),
                                                "pretrained_cfg": cfg, "label_names": cfg["label_names"]})
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"architecture": arch, "files": ["model.safetensors", "config.json"],
            "load": f"timm.create_model('local-dir:{folder.resolve()}', pretrained=True)"}


def export_model(checkpoint, fmt: str, output: Path, *, opset: int = 18, exporter: str = "dynamo",
                 atol: float = ATOL) -> dict:
    """Export ``checkpoint`` (:class:`fgclf.predict.Checkpoint`) as ``fmt`` into the folder ``output``;
    writes and returns ``output/export.json``."""
    from fgclf.models import create_model
    from fgclf.utils import atomic_write_json

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    config = checkpoint.config
    model = create_model(f"file:{checkpoint.path}", num_classes=config["num_classes"]).eval()
    if fmt == "timm":
        timm_architecture(model, config)  # refused before anything is written
    output.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        info = export_onnx(model, config, output / "model.onnx", opset=opset, exporter=exporter, atol=atol)
    elif fmt == "torchscript":
        info = export_torchscript(model, config, output / "model.torchscript.pt", atol=atol)
    else:
        info = export_timm(model, config, output)
    record = {"format": fmt, "source": str(checkpoint.path), "class_names": config.get("class_names"),
              "data_config": config.get("data_config"), "method": config.get("method"),
              "torch": torch.__version__, **info}
    atomic_write_json(output / "export.json", record)
    return record


__all__ = ["FORMATS", "export_model", "export_onnx", "export_timm", "export_torchscript", "timm_architecture"]
