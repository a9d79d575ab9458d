"""``report.html``: one self-contained page per run that a person looks at.

The metrics (and per-level metrics), the training curves and the confusion matrix (the PNGs of the
run directory, inlined), the per-class table (click a header to sort), the most confused class
pairs, each with a misclassified test image, its Grad-CAM maps for the predicted and the true
class (:mod:`fgclf.explain`), and a correctly classified image of the class it was taken for, and a gallery of misclassified test images with true and predicted classes. Images
are inlined as base64 JPEG thumbnails, so the file can be mailed or opened from anywhere.
Written by ``train_classifier.py`` after the test evaluation and by ``scripts/report.py RUN_DIR``.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

THUMB = 160  # pixels of the longer side of an inlined image


def _png(path: Path) -> Optional[str]:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _thumb(path: str) -> Optional[str]:
    """A base64 JPEG thumbnail of an image file, or None when it cannot be read."""
    try:
        from fgclf.data.datasets import load_image

        img = load_image(path)
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 -- a missing or broken file: the figure says so instead
        return None


def _figure(b64: Optional[str], caption: str, mime: str = "image/jpeg") -> str:
    img = (f'<img src="data:{mime};base64,{b64}" alt="{html.escape(caption)}">' if b64
           else '<div class="missing">image not readable</div>')
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def pair_maps(run_dir: Path, paths: Sequence[str], picks: Sequence[tuple[int, int, int]]) -> Optional[list]:
    """Grad-CAM overlays (base64 JPEGs) of each pick ``(test index, true, predicted)``: the map of the
    predicted and of the true class over the image as the run's best model sees it; None when
    there is no best checkpoint or the maps fail (the page says so)."""
    best = run_dir / "checkpoints" / "best"
    if not picks or not (best / "config.json").is_file():
        return None
    try:
        import matplotlib
        import torch
        from PIL import Image

        from fgclf.data import create_transform
        from fgclf.data.datasets import load_image
        from fgclf.explain import class_maps, displayable
        from fgclf.models import create_model, read_checkpoint_config

        meta = read_checkpoint_config(best)
        model = create_model(f"file:{best}", num_classes=meta["num_classes"]).eval()
        data_config = meta.get("data_config") or {}
        tf = create_transform(data_config, is_training=False)
        x = torch.stack([tf(load_image(paths[i])) for i, _, _ in picks])
        # the predicted and the true class in one batch (one forward for the default 8 pairs)
        both = class_maps(model, torch.cat([x, x]), [p for _, _, p in picks] + [t for _, t, _ in picks])
        maps = [both[:len(picks)], both[len(picks):]]
        shown = displayable(x, data_config)
        cmap = matplotlib.colormaps["jet"]
        out = []
        for k in range(len(picks)):
            row = []
            for m in maps:
                blend = 0.55 * shown[k] + 0.45 * cmap(m[k])[..., :3]
                img = Image.fromarray((blend * 255).astype(np.uint8))
                img.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                row.append(base64.b64encode(buf.getvalue()).decode())
            out.append(row)
        return out
    except Exception:  # noqa: BLE001 -- a model the maps cannot take: the page goes without
        return None


def run_test_paths(run_dir: str | Path) -> list[str]:
    """The image file of each of a finished run's test predictions (``predictions.npz`` order), from
    the dataset its config.yaml names (its manifests only: no image is decoded).

    Raises:
        UserError: the dataset is not where the run found it, no longer holds those images, or its
            images are rows of an HF dataset rather than files.
    """
    from fgclf.config import TrainClassifierConfig, load_config
    from fgclf.data import load_kwargs_from_config, load_records
    from fgclf.errors import UserError

    run_dir = Path(run_dir)
    data = load_config(TrainClassifierConfig, run_dir / "config.yaml").data
    records = load_records(**load_kwargs_from_config(data), keep_missing=True)
    path_of = dict(zip(records.image_ids, records.items))
    ids = [str(i) for i in np.load(run_dir / "predictions.npz")["image_ids"]]
    missing = [i for i in ids if i not in path_of]
    if missing:
        raise UserError(f"{data.format} {data.root or ''} no longer has the run's test image {missing[0]}")
    if not all(isinstance(path_of[i], str) for i in ids):
        raise UserError(f"the run's test images are rows of an HF dataset ({data.root}), not files")
    return [path_of[i] for i in ids]


def confused_pairs(labels: np.ndarray, pred: np.ndarray, top: int) -> list[tuple[int, int, list[int]]]:
    """``(true, predicted, test indices)`` of the ``top`` most frequent confusions, most first."""
    pairs: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(labels != pred):
        pairs.setdefault((int(labels[i]), int(pred[i])), []).append(int(i))
    return [(t, p, idx) for (t, p), idx in sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]]


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3;cursor:pointer}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:4px;text-align:center;vertical-align:top}
figure img{width:140px;height:auto;display:block;margin:auto}
figcaption{font-size:11px;max-width:170px;word-wrap:break-word}.pair{margin:1em 0;border-top:1px solid #ddd}
.missing{width:120px;height:90px;background:#eee;font-size:11px;line-height:90px}.plot{max-width:100%}
"""
SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0];
    var rows = Array.from(body.rows), asc = th.dataset.asc !== 'true';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    th.dataset.asc = asc;
  });
});
"""


def write_html_report(run_dir: str | Path, test_paths: Optional[Sequence[str]] = None, *, pairs: int = 8,
                      gallery: int = 24, cams: bool = True) -> Path:
    """Write ``run_dir/report.html`` from its metrics.json, predictions.npz and figures.

    Args:
        test_paths: the image file of each test prediction (predictions.npz order); without them
            the page has the numbers and figures but no example images.
        pairs: most confused class pairs shown; gallery: misclassified images shown.
        cams: beside each pair's image, the Grad-CAM maps of the predicted and the true class
            (:func:`pair_maps`, from the run's best checkpoint; left out when they cannot be made).
    """
    from fgclf.utils import atomic_write_text

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    npz = np.load(run_dir / "predictions.npz")
    labels, probs = npz["labels"], npz["probs"]
    pred = probs.argmax(1)
    names = [str(n) for n in npz["class_names"]]
    paths = list(test_paths) if test_paths is not None else None
    h = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>{h(run_dir.name)}: {h(str(metrics.get('split', 'test')))} report</title>",
           f"<style>{STYLE}</style></head><body>",
           f"<h1>{h(run_dir.name)}</h1>",
           f"<p>{metrics.get('num_samples')} {h(str(metrics.get('split', 'test')))} images, {len(names)} classes; "
           f"model {h(str(metrics.get('model', '')))}, method {h(str(metrics.get('method', 'plain')))}.</p>",
           "<h2>Metrics</h2><table><tbody>"]
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(f"<tr><td>{h(key)}</td><td>{value:.4f}</td></tr>" if isinstance(value, float)
                       else f"<tr><td>{h(key)}</td><td>{value}</td></tr>")
    out.append("</tbody></table>")
    if metrics.get("levels"):
        out.append("<h3>Coarser levels (the fine softmax summed per coarse class)</h3><table><thead><tr><th>level</th>"
                   "<th>classes</th><th>top1</th><th>f1_macro</th></tr></thead><tbody>")
        for level, m in metrics["levels"].items():
            out.append(f"<tr><td>{h(level)}</td><td>{m['num_classes']}</td><td>{m['top1']:.4f}</td>"
                       f"<td>{m['f1_macro']:.4f}</td></tr>")
        out.append("</tbody></table>")
    for title, name in (("Training curves", "curves.png"), ("Confusion matrix (row-normalised)", "confusion_matrix.png")):
        b64 = _png(run_dir / name)
        if b64:
            out.append(f"<h2>{title}</h2><img class='plot' src='data:image/png;base64,{b64}' alt='{h(title)}'>")
    out.append("<h2>Per class</h2><p>Click a column to sort.</p><table class='sortable' id='per-class'><thead><tr>"
               + "".join(f"<th>{c}</th>" for c in ("class", "support", "accuracy", "precision", "f1")) + "</tr></thead><tbody>")
    for row in metrics.get("per_class", []):
        out.append(f"<tr><td>{h(str(row['class_name']))}</td><td>{row['support']}</td><td>{row['accuracy']:.4f}</td>"
                   f"<td>{row['precision']:.4f}</td><td>{row['f1']:.4f}</td></tr>")
    out.append("</tbody></table>")
    out.append("<h2>Most confused pairs</h2>")
    found = confused_pairs(labels, pred, pairs)
    if not found:
        out.append("<p>No test image was misclassified.</p>")
    maps = pair_maps(run_dir, paths, [(idx[0], t, p) for t, p, idx in found]) if cams and paths is not None else None
    if found and paths is not None and maps is None and cams:
        out.append("<p>(no class activation maps: the run has no best checkpoint, or the maps failed on its model)</p>")
    for k, (t, p, idx) in enumerate(found):
        out.append(f"<div class='pair'><h3>{h(names[t])} taken for {h(names[p])}: {len(idx)} images</h3>")
        if paths is not None:
            right = np.flatnonzero((labels == p) & (pred == p))
            out.append(_figure(_thumb(paths[idx[0]]), f"{names[t]} (p = {probs[idx[0], p]:.2f} for {names[p]})"))
            if maps is not None:
                out.append(_figure(maps[k][0], f"Grad-CAM: why {names[p]}"))
                out.append(_figure(maps[k][1], f"Grad-CAM: evidence for {names[t]}"))
            out.append(_figure(_thumb(paths[int(right[0])]), f"a {names[p]}, classified right") if len(right)
                       else "<p>(no correctly classified image of that class)</p>")
        out.append("</div>")
    wrong = np.flatnonzero(labels != pred)
    order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:gallery]  # the most confident errors first
    out.append(f"<h2>Misclassified images ({len(wrong)}; the {len(order)} most confident shown)</h2>")
    if paths is None:
        out.append("<p>(image files not available to this report)</p>")
    else:
        for i in order:
            out.append(_figure(_thumb(paths[int(i)]), f"true {names[labels[i]]}, predicted {names[pred[i]]} "
                                                      f"({probs[i, pred[i]]:.2f})"))
    out.append(f"<script>{SORT_JS}</script></body></html>")
    path = run_dir / "report.html"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path


__all__ = ["confused_pairs", "pair_maps", "run_test_paths", "write_html_report"]
