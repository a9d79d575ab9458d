"""Evaluation outputs of a run directory: metrics.json, predictions.npz, CSVs, plots, report.md.

Every file is written atomically (temporary file, fsync, rename) through :mod:`fgclf.utils`, so a
crash leaves either the old or the new complete file. matplotlib is imported inside the plotting
functions and drives an Agg canvas directly, so importing this module is cheap and never changes
the user's pyplot backend.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fgclf.errors import UserError
from fgclf.metrics import compute_metrics, confusion_matrix, format_metrics_table, level_metrics, per_class_metrics
from fgclf.utils import atomic_write_bytes, atomic_write_text

PER_CLASS_FIELDS = ("class_id", "class_name", "support", "accuracy", "precision", "f1")
CELL_TEXT_MAX_CLASSES = 30  # above this the confusion-matrix cells carry no numbers
TICK_LABEL_MAX_CLASSES = 200  # above this only every n-th class name is shown


def _to_builtin(obj: Any) -> Any:
    """JSON fallback for numpy/torch scalars and arrays, paths and other objects."""
    if isinstance(obj, (np.generic, torch.Tensor)) and np.size(obj) == 1:
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    return str(obj)


def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """Render a matplotlib Figure with Agg to PNG bytes and write them atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def save_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], run_dir: str | os.PathLike) -> None:
    """Write ``confusion_matrix.csv`` (counts) and ``confusion_matrix.png`` (row-normalised).

    Rows are true classes, columns predicted classes. The PNG scales with the number of classes;
    cells carry numbers only up to 30 classes, and names are shown for up to 200 classes.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    names = [str(n) for n in class_names]
    n = len(names)
    if cm.shape != (n, n):
        raise UserError(f"confusion matrix of shape {cm.shape} does not match {n} class names")
    run_dir = Path(run_dir)
    rows = [["true\\pred", *names]] + [[names[i], *cm[i].tolist()] for i in range(n)]
    atomic_write_text(run_dir / "confusion_matrix.csv", _csv_text(rows))

    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)
    side = min(max(6.0, 0.14 * n + 4.0), 32.0)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    step = max(1, math.ceil(n / TICK_LABEL_MAX_CLASSES))
    ticks = np.arange(0, n, step)
    labels = [names[i][:24] for i in ticks]
    fontsize = max(3.0, min(9.0, 0.6 * 72 * side / max(n / step, 1)))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (row-normalised, {n} classes, {int(cm.sum())} samples)")
    if n <= CELL_TEXT_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    _save_figure(fig, run_dir / "confusion_matrix.png")


def save_per_class(rows: list[dict], run_dir: str | os.PathLike) -> None:
    """Write ``per_class.csv`` with one row per class (columns from the first row)."""
    fields = list(rows[0]) if rows else list(PER_CLASS_FIELDS)
    table = [fields] + [[row.get(f, "") for f in fields] for row in rows]
    atomic_write_text(Path(run_dir) / "per_class.csv", _csv_text(table))


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(x, y) points of ``key``: x is the record's epoch (its index when absent)."""
    xs, ys = [], []
    for i, record in enumerate(history):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        epoch = record.get("epoch")
        xs.append(epoch if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else i)
        ys.append(float(value))
    return xs, ys


def plot_curves(history: list[dict], path: str | os.PathLike) -> bool:
    """Plot metrics.jsonl records: losses, val top1/f1_macro and lr, one panel each.

    Loss keys are ``train_loss`` and every other key ending in ``loss`` (e.g. ``val/loss``).
    Panels and series with no finite values are skipped.

    Returns:
        True when the PNG was written, False when there was nothing to plot.
    """
    from matplotlib.figure import Figure

    keys = sorted({k for record in history for k in record})
    loss_keys = ["train_loss"] + [k for k in keys if k.endswith("loss") and k != "train_loss"]
    panels = [("loss", loss_keys), ("validation metric", ["val/top1", "val/f1_macro"]),
              ("learning rate", ["lr"])]
    panels = [(title, [(k, _series(history, k)) for k in ks]) for title, ks in panels]
    panels = [(title, [(k, s) for k, s in series if s[1]]) for title, series in panels]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        return False
    fig = Figure(figsize=(5 * len(panels), 3.8))
    for index, (title, series) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), index)
        for key, (xs, ys) in series:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read one JSON object per line; blank lines are skipped.

    A truncated last line (a crash during a write) is dropped with a warning; a bad line
    elsewhere raises :class:`UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}: ignoring truncated last line {number}", stacklevel=2)
                continue
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return records


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line, then flush and fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=_to_builtin) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:  # "a" mode starts at the end; repair a line cut off by a crash
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned Markdown table of string cells (what the bench/ scripts print)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _md_table(rows: list[dict]) -> list[str]:
    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(PER_CLASS_FIELDS) + " |", "|" + "---|" * len(PER_CLASS_FIELDS)]
    return lines + ["| " + " | ".join(cell(r[f]) for f in PER_CLASS_FIELDS) + " |" for r in rows]


def _report_markdown(run_dir: Path, result: dict, rows: list[dict], has_curves: bool) -> str:
    """The text of report.md: metrics table, best/worst classes, embedded figures."""
    scalars = {k: v for k, v in result.items() if k not in ("per_class", "confusion_matrix", "levels")}
    files = ["metrics.json", "predictions.npz", "per_class.csv", "confusion_matrix.csv"]
    lines = [f"# Evaluation report: {run_dir.name} ({result['split']} split)", "",
             f"{result['num_samples']} samples, {result['num_classes']} classes. Files: "
             + ", ".join(f"[{f}]({f})" for f in files) + ".", "", "## Metrics", "", "```text",
             format_metrics_table(scalars), "```", ""]
    if result.get("levels"):  # coarser label levels: the fine prediction's probabilities summed per coarse class
        names = ["top1", "top5", "f1_macro", "balanced_accuracy"]
        lines += ["## Coarser levels", "", "The fine softmax summed over each coarse class.", "",
                  markdown_table(["level", "classes", *names],
                                 [[lv, str(m["num_classes"]), *("-" if n == "top5" and m["num_classes"] <= 5
                                                                 else f"{m[n]:.4f}" for n in names)]
                                  for lv, m in result["levels"].items()]), ""]
    lines += ["## Per-class accuracy", ""]
    best = sorted(rows, key=lambda r: (-r["accuracy"], r["class_id"]))
    if len(rows) <= 20:
        lines += ["All classes, best first.", ""] + _md_table(best)
    else:
        worst = sorted(rows, key=lambda r: (r["accuracy"], r["class_id"]))
        lines += ["### Best 10", ""] + _md_table(best[:10])
        lines += ["", "### Worst 10", ""] + _md_table(worst[:10])
    if has_curves:
        lines += ["", "## Training curves", "", "![Training curves](curves.png)"]
    lines += ["", "## Confusion matrix", "", "![Confusion matrix, row-normalised](confusion_matrix.png)"]
    return "\n".join(lines) + "\n"


def _save_predictions(run_dir: Path, logits: np.ndarray, labels: np.ndarray,
                      class_names: list[str], image_ids: Any) -> None:
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy().astype(np.float32)
    arrays = {"logits": logits, "probs": probs, "labels": labels,
              "class_names": np.array(class_names, dtype=np.str_)}
    if image_ids is not None:
        ids = np.asarray(image_ids)
        if ids.dtype == object:
            ids = ids.astype(np.str_)
        if ids.shape != labels.shape:
            raise UserError(f"got {ids.shape[0] if ids.ndim else 0} image ids for {labels.shape[0]} samples")
        arrays["image_ids"] = ids
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(run_dir / "predictions.npz", buf.getvalue())


def write_evaluation(run_dir: str | os.PathLike, *, logits: Any, labels: Any, class_names: Sequence[str],
                     history: list[dict] | None = None, split: str = "test",
                     extra: dict | None = None, image_ids: Any = None,
                     levels: dict | None = None) -> dict:
    """Compute every metric and write the evaluation files of a run directory.

    Writes metrics.json, predictions.npz, confusion_matrix.csv/.png, per_class.csv, curves.png
    (when ``history`` has something to plot) and report.md. Metrics are computed from the
    float32 logits stored in predictions.npz, so they can be recomputed exactly from that file.

    Args:
        run_dir: output folder (created).
        logits: ``(N, C)`` scores, torch or numpy.
        labels: ``(N,)`` integer labels.
        class_names: ``C`` names.
        history: metrics.jsonl records for curves.png.
        split: name of the evaluated split.
        extra: additional JSON-able entries for metrics.json (must not shadow computed keys).
        image_ids: optional ``(N,)`` ids stored in predictions.npz.
        levels: the dataset's coarser label levels, ``{level: (names, coarse index of each
            class)}`` (``Records.levels``): metrics.json ``levels`` and report.md then give the
            metrics at each level (:func:`fgclf.metrics.level_metrics`).
    Returns:
        The metrics.json content.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logits_np = (logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor)
                 else np.asarray(logits)).astype(np.float32)
    labels_np = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor)
                 else np.asarray(labels)).astype(np.int64)
    if logits_np.ndim != 2:
        raise UserError(f"logits must have shape (N, C), got {logits_np.shape}")
    num_classes = logits_np.shape[1]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise UserError(f"got {len(names)} class names for {num_classes} logit columns")

    result: dict[str, Any] = compute_metrics(logits_np, labels_np, num_classes=num_classes)
    result.update(num_samples=int(labels_np.shape[0]), split=split, num_classes=num_classes)
    clash = sorted(set(extra or {}) & (set(result) | {"per_class", "confusion_matrix"}))
    if clash:
        raise ValueError(f"extra entries would overwrite computed ones: {clash}")
    result.update(extra or {})
    cm = confusion_matrix(logits_np, labels_np, num_classes=num_classes)
    rows = per_class_metrics(logits_np, labels_np, num_classes=num_classes, class_names=names)
    if levels:
        result["levels"] = {name: {"num_classes": len(level_names),
                                   **level_metrics(logits_np, labels_np, of=of, num_coarse=len(level_names))}
                            for name, (level_names, of) in levels.items() if len(level_names) >= 2}
    result["per_class"] = rows
    result["confusion_matrix"] = cm.tolist()

    # NaN (e.g. auroc_macro with a single class present) is written as JSON's NaN extension.
    _save_predictions(run_dir, logits_np, labels_np, names, image_ids)
    save_confusion_matrix(cm, names, run_dir)
    save_per_class(rows, run_dir)
    has_curves = plot_curves(history, run_dir / "curves.png") if history else False
    atomic_write_text(run_dir / "report.md", _report_markdown(run_dir, result, rows, has_curves))
    # written last: a finished metrics.json means every other result file is complete
    atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2, default=_to_builtin) + "\n")
    return result
