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

* ``adapter``: a PEFT run's adapter in PEFT's own format (``adapter_model.safetensors`` +
  ``adapter_config.json``, whose ``base_model_name_or_path`` names the base) with the fgclf
  ``config.json`` (the base reference: model name, pretrained tag or weight file) and a
  ``README.md`` with the code that rebuilds it: timm + ``peft.PeftModel.from_pretrained`` for a
  plain model, ``fgclf.checkpoint.load_adapter_model`` for a method's model; the base weights
  are not copied (megabytes instead of the whole model);
* ``hub``: a folder for the HF hub: the ``timm`` files for a plain timm model (else the fgclf
  export) and a ``README.md`` model card (data, protocol, test metrics with the interval over
  a sweep's seeds, the training config, intended use and limits, the pretrained weights'
  license); :func:`push_to_hub` uploads it.

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

from fgclf.errors import UserError, error_line
from fgclf.utils import atomic_write_json, atomic_write_text

FORMATS = ("onnx", "torchscript", "timm", "hub", "adapter")
ATOL = 1e-4


def _cause(err: BaseException) -> str:
    """``Type: first line`` of the error, and of the innermost error it was raised from (torch.onnx wraps
    the real failure in a ConversionError whose first line is the step that failed)."""
    inner, seen = err, {id(err)}
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:  # (a cycle ends the walk)
        inner = inner.__cause__
        seen.add(id(inner))
    text = error_line(err, 160)
    if inner is not err:
        text += f" <- {error_line(inner)}"
    return text


def _inputs(config: dict, batch: int, seed: int) -> torch.Tensor:
    size = tuple((config.get("data_config") or {}).get("input_size") or (3, 224, 224))
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def _check(name: str, run: Any, model: nn.Module, x: torch.Tensor, path: Path, atol: float) -> float:
    """Run the export (``run(x)``) on ``x`` (a batch size never traced) and compare with the model;
    a failure or a difference above ``atol`` removes the export and is a UserError."""
    import numpy as np

    try:
        got = run(x)
        with torch.no_grad():
            want = model(x)
        diff = float(np.abs(np.asarray(got, dtype=np.float64) - want.double().numpy()).max())
        why = None if diff <= atol else f"max |logit difference| {diff:.2e} > {atol:g}"  # nan too
    except Exception as err:  # e.g. a batch size baked into the trace
        diff, why = float("nan"), error_line(err)
    if why is not None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        raise UserError(f"the {name} export does not reproduce the model on a batch of other inputs ({why}); the "
                        "model has steps tracing cannot capture (a fixed batch size, data-dependent crops or "
                        "selections): use --format timm or the fgclf export")
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
                              output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False,
                              external_data=False)  # one self-contained file (models under 2 GB)
        else:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    except UserError:
        raise
    except Exception as err:  # the exporter's own errors: unsupported operators, data-dependent shapes
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
        raise UserError(f"ONNX export failed ({_cause(err)}); "
                        "try --onnx-exporter torchscript or --format torchscript") from None
    os.replace(tmp, path)
    def run(x: torch.Tensor):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = _check("ONNX", run, model, _inputs(config, 3, 1), path, atol)
    return {"file": path.name, "opset": opset, "exporter": exporter, "max_abs_diff": diff,
            "onnxruntime": ort.__version__}


def export_torchscript(model: nn.Module, config: dict, path: Path, *, atol: float = ATOL) -> dict:
    """Write ``path`` (.pt, ``torch.jit.trace``) and check the reloaded module on another batch."""
    x = _inputs(config, 2, 0)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, (x,), check_trace=False)
    except Exception as err:
        raise UserError(f"TorchScript tracing failed ({error_line(err, 300)})") from None
    tmp = path.with_name(f".{path.name}.partial")
    traced.save(str(tmp))
    os.replace(tmp, path)
    def run(x: torch.Tensor):
        with torch.no_grad():
            return torch.jit.load(str(path))(x).numpy()
    diff = _check("TorchScript", run, model, _inputs(config, 3, 1), path, atol)
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

    arch = timm_architecture(model, config)
    cfg = {k: v for k, v in (model.pretrained_cfg or {}).items() if isinstance(v, (str, int, float, bool, list, tuple,
                                                                                  type(None)))}
    data = config.get("data_config") or {}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
    cfg.update(num_classes=int(config["num_classes"]), label_names=list(config.get("class_names") or []))
    for key in ("hf_hub_id", "url", "file"):  # where the pretrained weights came from, not these
        cfg.pop(key, None)
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


def check_adapter(checkpoint) -> None:
    """A UserError unless ``checkpoint`` is a PEFT run's whose base weights can be found again."""
    from fgclf.checkpoint import ADAPTER_NAME

    config = checkpoint.config
    if not config.get("peft") or not (checkpoint.path / ADAPTER_NAME).is_file():
        raise UserError("--format adapter writes a PEFT run's adapter; this model was not trained with --peft "
                        "(export it as onnx, torchscript, timm or hub)")
    base = config.get("base") or {}
    if not base.get("pretrained") and not base.get("weights"):
        raise UserError("--format adapter: the adapter was trained on randomly initialised base weights, which no "
                        "reference can rebuild; export the merged model (--format onnx, torchscript, timm or hub)")


def base_reference(config: dict) -> str:
    """What the adapter's base is: the local weight file, timm's hub id, or the model name."""
    base = config.get("base") or {}
    if base.get("weights"):
        return str(Path(base["weights"]).resolve())
    name = base.get("model_name") or config["model_name"]
    return name if ":" in name else f"timm/{name}"


def export_adapter(checkpoint, folder: Path) -> dict:
    """PEFT's adapter files + the fgclf config.json + a README.md that says how to rebuild the model."""
    from fgclf.checkpoint import ADAPTER_NAME, load_adapter_model

    check_adapter(checkpoint)
    config = checkpoint.config
    structure = load_adapter_model(checkpoint.path, base_weights=False)  # for its PEFT config; no download
    peft_config = structure.peft_config["default"]
    peft_config.base_model_name_or_path = base_reference(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    base = config.get("base") or {}
    name = base.get("model_name") or config["model_name"]
    method = (config.get("method") or {}).get("name", "plain")
    if method == "plain" and ":" not in name:
        overlay = f", pretrained_cfg_overlay=dict(file={base['weights']!r})" if base.get("weights") else ""
        kwargs = "".join(f", {k}={v!r}" for k, v in (config.get("model_kwargs") or {}).items())
        loads_with = ("import timm\nfrom peft import PeftModel\n\n"
                      f"base = timm.create_model({name!r}, pretrained=True, num_classes={int(config['num_classes'])}"
                      f"{overlay}{kwargs})\nmodel = PeftModel.from_pretrained(base, {str(folder.resolve())!r}).eval()")
    else:
        loads_with = ("from fgclf.checkpoint import load_adapter_model\n\n"
                      f"model = load_adapter_model({str(folder.resolve())!r})  # the base rebuilt, the adapter applied")
    try:
        peft_config.save_pretrained(str(tmp))  # adapter_config.json
        shutil.copyfile(checkpoint.path / ADAPTER_NAME, tmp / ADAPTER_NAME)
        atomic_write_json(tmp / "config.json", {**config, "tta_flip": checkpoint.tta_flip, "tta": checkpoint.tta})
        atomic_write_text(tmp / "README.md", model_card(checkpoint, config, loads_with=loads_with, license_=None,
                                                        library="peft"))
        folder.mkdir(parents=True, exist_ok=True)
        files = ["adapter_config.json", ADAPTER_NAME, "config.json", "README.md"]
        for file in files:
            os.replace(tmp / file, folder / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": files, "base": peft_config.base_model_name_or_path, "load": loads_with.splitlines()[-1],
            "adapter_bytes": (folder / ADAPTER_NAME).stat().st_size}


def _seed_interval(run: Optional[Path], metric: str) -> Optional[dict]:
    """Mean and 95% t-interval of ``metric`` over the run and its sibling seeds (a sweep's
    ``<variant>/seed<S>`` folders), when there are at least two finished ones."""
    if run is None or not run.name.startswith("seed"):
        return None
    values = []
    for sibling in sorted(run.parent.glob("seed*")):
        try:
            values.append(float(json.loads((sibling / "metrics.json").read_text())[metric]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if len(values) < 2:
        return None
    from fgclf.stats import summarize

    s = summarize(values)
    return {"n": s["n"], "mean": s["mean"], "ci_lo": s["ci_lo"], "ci_hi": s["ci_hi"]}


def model_card(checkpoint, config: dict, *, loads_with: str, license_: Optional[str], library: str = "timm") -> str:
    """The README.md of a hub folder: what the model is, how it was trained and tested, its
    numbers (with the interval over the sweep's seeds when there are several), and its limits."""
    import yaml

    run = checkpoint.path.parent.parent if checkpoint.path.parent.name == "checkpoints" else None
    metrics = {}
    settings = {}
    if run is not None and (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
    if run is not None and (run / "config.yaml").is_file():
        settings = yaml.safe_load((run / "config.yaml").read_text()) or {}
    data = settings.get("data") or {}
    method = (config.get("method") or {}).get("name", "plain")
    names = config.get("class_names") or []
    front = {"library_name": library, "license": license_ or "other",
             "tags": ["image-classification", "fine-grained", "fgclf", *( [method] if method != "plain" else [])],
             "pipeline_tag": "image-classification"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {(run.parent.name + '/' + run.name) if run is not None and run.name.startswith('seed') else (run or checkpoint.path).name}",
             "",
             f"A fine-grained image classifier ({len(names)} classes) trained with fgclf from "
             f"`{(config.get('base') or {}).get('model_name') or config.get('model_name')}`"
             + (f", method `{method}`" if method != "plain" else "") + ".", "",
             "## Use", "", "```python", loads_with, "```", "",
             f"Input: {(config.get('data_config') or {}).get('input_size')} images, mean "
             f"{(config.get('data_config') or {}).get('mean')}, std {(config.get('data_config') or {}).get('std')}, "
             f"crop_pct {(config.get('data_config') or {}).get('crop_pct')}.", ""]
    lines += ["## Training data and protocol", ""]
    if data:
        sizes = (settings.get("run") or {}).get("split_sizes") or {}
        lines += [f"Dataset: `--data.format {data.get('format')}` ({Path(str(data.get('root') or '')).name or 'embedded'}); "
                  f"train / val / test images: {sizes.get('train', '?')} / {sizes.get('val', '?')} / "
                  f"{sizes.get('test', '?')}; image size {data.get('image_size')}; augmentation "
                  f"`{(data.get('aug') or {}).get('preset')}`.", ""]
    else:
        lines += ["Not recorded (the model folder is not inside a run directory).", ""]
    if metrics:
        lines += ["## Test metrics", "", "| metric | this run | mean over the sweep's seeds (95% CI) |", "|---|---|---|"]
        for key in ("top1", "top5", "f1_macro", "balanced_accuracy"):
            if key in metrics:
                interval = _seed_interval(run, key)
                spread = (f"{interval['mean']:.4f} [{interval['ci_lo']:.4f}, {interval['ci_hi']:.4f}], n = {interval['n']}"
                          if interval else "one run")
                lines.append(f"| {key} | {float(metrics[key]):.4f} | {spread} |")
        for level, m in (metrics.get("levels") or {}).items():
            lines.append(f"| {level}.top1 | {float(m['top1']):.4f} | |")
        lines.append("")
    lines += ["## Intended use and limits", "",
              "Classifies images into the classes it was trained on; it has no 'none of these' class and gives "
              "confident answers on images of other things. Its accuracy holds for images like its test split "
              "(same source, framing and resolution); expect less on other cameras, crops or regions. "
              + ("Stanford Dogs was built from ImageNet images, so ImageNet-pretrained weights may have seen its "
                 "test images. " if data.get("format") == "stanford_dogs" else "")
              + ("Trained from scratch (no pretrained weights)." if (config.get("base") or {}).get("pretrained") is False
                 else f"The pretrained weights' license: {license_ or 'not recorded by timm; check the base model'}."),
              ""]
    if settings:
        lines += ["## Training configuration", "", "<details><summary>config.yaml</summary>", "", "```yaml",
                  yaml.safe_dump({k: v for k, v in settings.items() if k != "run"}, sort_keys=False).strip(), "```",
                  "", "</details>", ""]
    return "\n".join(lines)


def export_hub(model: nn.Module, checkpoint, folder: Path) -> dict:
    """A folder ready for the hub: a plain timm model in timm's format (loads with ``hf-hub:``),
    any other model (methods) as the fgclf export; with a ``README.md`` model card."""
    config = checkpoint.config
    base = config.get("base") or {}
    scratch = base.get("pretrained") is False and not base.get("weights")
    license_ = None if scratch else (getattr(model, "pretrained_cfg", None) or {}).get("license")
    try:
        timm_architecture(model, config)
        info = export_timm(model, config, folder)
        loads_with = "import timm\nmodel = timm.create_model('hf-hub:<user>/<repo>', pretrained=True)"
    except UserError:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".model.safetensors.partial"
        shutil.copyfile(checkpoint.path / "model.safetensors", tmp)
        os.replace(tmp, folder / "model.safetensors")
        atomic_write_json(folder / "config.json", {**config, "tta_flip": checkpoint.tta_flip,  # predict.py reads them
                                                   "tta": checkpoint.tta})
        info = {"files": ["model.safetensors", "config.json"], "load": f"fgclf create_model('file:{folder}')"}
        loads_with = ("# pip install fgclf; download the folder (huggingface_hub.snapshot_download)\n"
                      "from fgclf.models import create_model\nmodel = create_model('file:<downloaded folder>')")
    library = "timm" if "import timm" in loads_with else "fgclf"
    atomic_write_text(folder / "README.md", model_card(checkpoint, config, loads_with=loads_with, license_=license_,
                                                       library=library))
    return {**info, "files": [*info["files"], "README.md"]}


def check_hub_access() -> None:
    """A UserError when an upload cannot work: no huggingface_hub, the hub offline, or no token."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub: the hub is offline (HF_HUB_OFFLINE is set); export with --format hub now "
                        "and upload the folder later")
    if not huggingface_hub.get_token():
        raise UserError("--push-to-hub needs a token: `huggingface-cli login` or HF_TOKEN")


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload ``folder`` to the hub model repo ``repo_id`` (created if needed); its URL. Refused
    with one line when the hub is offline (``HF_HUB_OFFLINE``) or no token is set."""
    from huggingface_hub import HfApi

    check_hub_access()
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="fgclf export")
    except Exception as err:  # network, permissions, a bad repo name
        raise UserError(f"--push-to-hub {repo_id} failed ({error_line(err)}); "
                        f"the folder {folder} is complete and can be uploaded again") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def export_model(checkpoint, fmt: str, output: Path, *, opset: int = 18, exporter: str = "dynamo",
                 atol: float = ATOL) -> dict:
    """Export ``checkpoint`` (:class:`fgclf.predict.Checkpoint`) as ``fmt`` into the folder ``output``;
    writes and returns ``output/export.json``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    config = checkpoint.config
    if fmt == "adapter":
        check_adapter(checkpoint)  # refused before anything is written
    model = None if fmt == "adapter" else checkpoint.load_model()
    if fmt == "timm":
        timm_architecture(model, config)  # refused before anything is written
    output.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        info = export_onnx(model, config, output / "model.onnx", opset=opset, exporter=exporter, atol=atol)
    elif fmt == "torchscript":
        info = export_torchscript(model, config, output / "model.torchscript.pt", atol=atol)
    elif fmt == "hub":
        info = export_hub(model, checkpoint, output)
    elif fmt == "adapter":
        info = export_adapter(checkpoint, output)
    else:
        info = export_timm(model, config, output)
    record = {"format": fmt, "source": str(checkpoint.path), "tta_flip": checkpoint.tta_flip, "tta": checkpoint.tta,
              "class_names": config.get("class_names"),
              "data_config": config.get("data_config"), "method": config.get("method"),
              "torch": torch.__version__, **info}
    atomic_write_json(output / "export.json", record)
    return record


__all__ = ["FORMATS", "base_reference", "check_adapter", "check_hub_access", "export_adapter", "export_hub", "export_model", "export_onnx", "export_timm", "export_torchscript", "model_card",
           "push_to_hub", "timm_architecture"]
