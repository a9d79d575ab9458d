"""Predictions of a trained model on new images (``scripts/predict.py``).

* :func:`resolve_checkpoint`: a run directory (its ``checkpoints/best``), a checkpoint folder or
  an export (``config.json`` + ``model.safetensors``), with the run's test-time flip when known;
* :func:`collect_inputs`: image files, folders (recursively, sorted), and ``.txt`` / ``.csv``
  lists of paths (relative to the list's folder) in, in the order given; :func:`dataset_inputs`:
  one split of any dataset ``--data.format`` reads (HF datasets included);
* :func:`predict`: batched, optionally sharded over the processes of an ``Accelerator`` (each
  process a contiguous slice, gathered back in input order); an image that cannot be decoded
  is reported with its reason and skipped, never a crash mid-way;
* :func:`write_predictions`: top-k names and probabilities as CSV and JSONL (optionally the
  logits), the failures as ``<output>.errors.csv``, each written atomically.

The model's eval-mode forward is its method's inference (WS-DAN's crop average, PIM's
combiner, the hierarchy's consistent prediction), so predictions equal the run's test
predictions on the same images.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from fgclf.data.datasets import IMAGE_EXTENSIONS
from fgclf.errors import UserError

LIST_SUFFIXES = (".txt", ".csv")


@dataclass
class Checkpoint:
    """A model folder to predict with: ``path`` (config.json + weights, or a PEFT adapter over
    recorded base weights: ``adapter``), its ``config`` and the test-time flip of the run it comes
    from (None when not known), or its multi-view TTA (``tta``: ``five_crop``, ``ten_crop``,
    ``multiscale``; :mod:`fgclf.tta`)."""

    path: Path
    config: dict
    tta_flip: Optional[bool] = None
    adapter: bool = False
    tta: Optional[str] = None

    def load_model(self):
        """The model in eval mode: the merged export, or the base rebuilt with the adapter merged in."""
        if self.adapter:
            from fgclf.checkpoint import load_adapter_model

            return load_adapter_model(self.path).merge_and_unload().eval()
        from fgclf.models import create_model

        return create_model(f"file:{self.path}", num_classes=self.config["num_classes"]).eval()


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """``path`` as a model folder: a run directory means its ``checkpoints/best``."""
    from fgclf.ensemble import run_tta, run_tta_flip
    from fgclf.models import read_checkpoint_config

    path = Path(path)
    if not path.exists():
        raise UserError(f"--model: no such run directory or model folder: {path}")
    run = None
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        run, path = path, path / "checkpoints" / "best"
        if not (path / "config.json").is_file():
            raise UserError(f"{run} has no best checkpoint ({path}); is the run finished? (predict with "
                            f"{run / 'checkpoints' / 'last'} to use its last state)")
    elif path.parent.name == "checkpoints":
        run = path.parent.parent
    from fgclf.checkpoint import ADAPTER_NAME

    adapter = (path / ADAPTER_NAME).is_file() and not (path / "model.safetensors").is_file()
    if adapter:  # an adapter export (scripts/export.py --format adapter): no merged weights
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path} has an adapter but no readable config.json ({err})") from None
    else:
        config = read_checkpoint_config(path)
    flip = run_tta_flip(run) if run is not None else config.get("tta_flip")  # an export records its run's
    views = run_tta(run) if run is not None else config.get("tta")
    return Checkpoint(path, config, flip if isinstance(flip, bool) else None, adapter,
                      views if views in ("five_crop", "ten_crop", "multiscale") else None)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_list(path: Path) -> list[str]:
    """Paths from a ``.txt`` (one per line, ``#`` comments) or ``.csv`` (a ``path`` column, else the first)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".txt":
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        return []
    column = rows[0].index("path") if "path" in rows[0] else 0
    start = 1 if rows[0][column].strip().lower() in ("path", "file", "image", "filename") else 0
    return [r[column].strip() for r in rows[start:] if len(r) > column]


@dataclass
class Inputs:
    """The images to predict, in order, and the files passed over (``(path, reason)``). With
    ``records`` (a dataset split) the images are its items and ``paths`` their image ids."""

    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    records: Any = None


def dataset_inputs(data, split: str) -> Inputs:
    """One split of a dataset (a :class:`fgclf.config.DataConfig`: any ``--data.format``, HF
    included) as inputs: its images in the dataset's order, named by their image ids."""
    from fgclf.data import load_records_from_config

    if split not in ("train", "val", "test"):
        raise UserError(f"--split must be train, val or test, got {split!r}")
    records = load_records_from_config(data)[0].split(split)
    if not len(records):
        raise UserError(f"the {split} split of {data.format} {data.root or ''} has no images".replace("  ", " "))
    return Inputs([str(i) for i in records.image_ids], records=records)


def collect_inputs(sources: Sequence[str | Path]) -> Inputs:
    """Expand ``sources`` into image paths (in the order given; folders sorted, recursively).

    A folder's files without an image extension are listed as skipped; a path that does not exist
    (given directly or in a list) is a UserError before any work.
    """
    out = Inputs()
    for source in sources:
        source = Path(source)
        if source.is_dir():
            for f in sorted(p for p in source.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in f.relative_to(source).parts):
                    continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
                if _is_image(f):
                    out.paths.append(str(f))
                else:
                    out.skipped.append((str(f), f"not an image file (extension {f.suffix or 'none'})"))
        elif source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
            listed = [Path(p) if Path(p).is_absolute() else source.parent / p for p in _read_list(source)]
            missing = [p for p in listed if not p.is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{source} lists {missing[0]}, which does not exist{more}")
            out.paths.extend(str(p) for p in listed)
        elif source.is_file():
            out.paths.append(str(source))
        else:
            raise UserError(f"no such image, folder or list: {source}")
    if not out.paths:
        raise UserError("no images to predict in " + ", ".join(str(s) for s in sources))
    return out


class _Images:
    """``(tensor, index, error)`` per path (or per item of ``records``); an image that fails to decode
    gives a blank tensor and the reason, so one bad file never stops a batch."""

    def __init__(self, paths: Sequence[str], transform, indices: Sequence[int], size: tuple[int, int, int],
                 records: Any = None) -> None:
        self.paths, self.transform, self.indices, self.size = paths, transform, list(indices), size
        self.dataset = None
        if records is not None:
            from fgclf.data.datasets import ImageDataset

            self.dataset = ImageDataset(records)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        import torch

        from fgclf.data.datasets import load_image

        index = self.indices[k]
        try:
            image = self.dataset.load(index) if self.dataset is not None else load_image(self.paths[index])
            return self.transform(image), index, ""
        except Exception as err:  # noqa: BLE001 -- PIL raises many types; reported per file
            return torch.zeros(self.size), index, f"{type(err).__name__}: {err}".strip()


@dataclass
class Predictions:
    """Per input path (in input order): logits (None for a failure) and the failure reasons."""

    paths: list[str]
    logits: list[Optional[np.ndarray]]
    errors: dict[int, str]
    class_names: list[str]


def predict(checkpoint: Checkpoint, inputs: Inputs, *, batch_size: int = 32, num_workers: int = 0,
            tta_flip: Optional[bool] = None, accelerator: Any = None, progress: bool = False,
            tta: Optional[str] = None) -> Predictions:
    """Logits of every input image (the method's inference; the run's TTA unless ``tta_flip`` or
    ``tta``, a mode of :mod:`fgclf.tta`, says otherwise). Multi-view TTA gives log mean probabilities.

    With an ``accelerator`` of several processes each takes a contiguous slice of the inputs and
    the main process gets them all back in input order (the others get the same object).
    """
    import torch
    from torch.utils.data import DataLoader

    from fgclf.data import create_transform
    from fgclf.data.mixup import tta_flip_logits

    meta = checkpoint.config
    flip = checkpoint.tta_flip if tta_flip is None else tta_flip
    mode = tta if tta is not None else (checkpoint.tta if tta_flip is None else None)
    if mode in ("none", "flip"):
        flip, mode = mode == "flip", None
    data_config = meta.get("data_config") or {}
    transform = create_transform(data_config, is_training=False)
    size = tuple(data_config.get("input_size") or (3, 224, 224))
    n, rank, world = len(inputs.paths), 0, 1
    device = torch.device("cpu")
    if accelerator is not None:
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    per = -(-n // world)
    mine = range(min(n, rank * per), min(n, (rank + 1) * per))
    model = checkpoint.load_model().to(device)
    loader = DataLoader(_Images(inputs.paths, transform, mine, size, inputs.records), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    logits: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predict", disable=rank != 0)
    with torch.no_grad():
        for images, indices, reasons in loader:
            ok = [k for k, r in enumerate(reasons) if not r]
            errors.update({int(indices[k]): reasons[k] for k in range(len(reasons)) if reasons[k]})
            if not ok:
                continue
            x = images[ok].to(device)
            if mode is not None:
                from fgclf.tta import tta_logits

                out = tta_logits(model, x, mode)
            else:
                out = tta_flip_logits(model, x) if flip else model(x)
            for k, row in zip(ok, out.float().cpu().numpy()):
                logits[int(indices[k])] = row
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(logits, errors)])
        logits, errors = {}, {}
        for lg, er in parts:
            logits.update(lg)
            errors.update(er)
    return Predictions(list(inputs.paths), [logits.get(i) for i in range(n)], errors,
                       list(meta.get("class_names") or [str(c) for c in range(meta["num_classes"])]))


def write_predictions(pred: Predictions, output: str | Path, *, topk: int = 5, save_logits: bool = False,
                      skipped: Sequence[tuple[str, str]] = ()) -> dict[str, Path]:
    """``output`` (CSV: path, then class and probability for ranks 1..k), the same as JSONL
    beside it (``.jsonl``; with ``save_logits`` the logits too) and, when any, the files that were
    not predicted (``<stem>.errors.csv``: path, reason). Returns the paths written."""
    import torch

    from fgclf.utils import atomic_write_text

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    k = min(topk, len(pred.class_names))
    header = ["path"] + [f"{what}{r}" for r in range(1, k + 1) for what in ("class", "prob")]
    rows, lines = [header], []
    for i, path in enumerate(pred.paths):
        if pred.logits[i] is None:
            continue
        probs = torch.softmax(torch.from_numpy(pred.logits[i]).double(), 0)
        top = torch.topk(probs, k)
        names = [pred.class_names[c] for c in top.indices.tolist()]
        values = [round(float(p), 6) for p in top.values]
        rows.append([path] + [x for pair in zip(names, values) for x in pair])
        record: dict[str, Any] = {"path": path, "classes": names, "probs": values}
        if save_logits:
            record["logits"] = [float(v) for v in pred.logits[i]]
        lines.append(json.dumps(record))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(output, buf.getvalue())
    jsonl = output.with_suffix(".jsonl")
    atomic_write_text(jsonl, "".join(line + "\n" for line in lines))
    written = {"csv": output, "jsonl": jsonl}
    failures = [(pred.paths[i], why) for i, why in sorted(pred.errors.items())] + list(skipped)
    errors_path = output.with_name(output.stem + ".errors.csv")
    if failures:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([["path", "reason"], *failures])
        atomic_write_text(errors_path, buf.getvalue())
        written["errors"] = errors_path
    elif errors_path.exists():  # a stale list from an earlier run on the same output
        errors_path.unlink()
    return written


__all__ = ["Checkpoint", "Inputs", "Predictions", "collect_inputs", "dataset_inputs", "predict", "resolve_checkpoint",
           "write_predictions"]
