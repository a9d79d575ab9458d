"""scripts/predict.py against the run's own test predictions, on broken inputs, and on 2 processes."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import _run_in_process, last_error_line, run_script, train_toy

from fgclf.data import load_records


@pytest.fixture(scope="module")
def run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    train_toy(toy_root, out, "--train.epochs", "1", "--train.tta_flip", "true")
    return out


def _test_paths(run: Path, toy_root: Path) -> list[str]:
    """The run's test images, in the order of its predictions.npz."""
    rec = load_records(format="cub", root=str(toy_root), val_fraction=0.15)
    path_of = dict(zip(rec.image_ids, rec.items))
    return [path_of[i] for i in np.load(run / "predictions.npz")["image_ids"]]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _args(*extra) -> list[str]:
    return ["--num-workers", "0", "--progress", "false", *[str(e) for e in extra]]


def test_predictions_equal_the_runs_test_predictions(run, toy_root, tmp_path):
    """Listed test images through the run directory: the run's TTA, the same logits as predictions.npz."""
    listing = tmp_path / "test.txt"
    listing.write_text("\n".join(_test_paths(run, toy_root)) + "\n")
    out = tmp_path / "preds.csv"
    proc = _run_in_process("predict.py", _args("--model", run, listing, "--output", out, "--save-logits",
                                               "--topk", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = np.load(run / "predictions.npz")
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.array([r["logits"] for r in records]), npz["logits"], atol=1e-4)
    names = list(npz["class_names"])
    rows = _rows(out)
    assert [r["path"] for r in rows] == listing.read_text().split()
    assert [r["class1"] for r in rows] == [names[k] for k in npz["logits"].argmax(1)]
    np.testing.assert_allclose([float(r["prob1"]) for r in rows], npz["probs"].max(1), atol=1e-5)
    assert list(rows[0]) == ["path", "class1", "prob1", "class2", "prob2", "class3", "prob3"]
    assert not out.with_name("preds.errors.csv").exists()
    # its checkpoint folder predicts the same; without the run's flip the logits differ (the TTA was the run's)
    same, plain = tmp_path / "same.csv", tmp_path / "plain.csv"
    assert _run_in_process("predict.py", _args("--model", run / "checkpoints" / "best", listing, "--output",
                                               same, "--topk", "3")).returncode == 0
    assert same.read_text() == out.read_text()
    assert _run_in_process("predict.py", _args("--model", run, listing, "--output", plain, "--save-logits",
                                               "--tta-flip", "false")).returncode == 0
    no_flip = np.array([json.loads(x)["logits"] for x in plain.with_suffix(".jsonl").read_text().splitlines()])
    assert np.abs(no_flip - npz["logits"]).max() > 1e-3


def test_folder_with_a_broken_image_and_another_file(run, toy_root, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    good = _test_paths(run, toy_root)[:3]
    for k, p in enumerate(good):
        shutil.copy(p, folder / ("sub" if k == 2 else "") / f"img{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("field notes")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    out = tmp_path / "p.csv"
    proc = _run_in_process("predict.py", _args("--model", run, folder, "--output", out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [Path(r["path"]).name for r in _rows(out)] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    errors = {Path(r["path"]).name: r["reason"] for r in _rows(tmp_path / "p.errors.csv")}
    assert set(errors) == {"broken.jpg", "notes.txt"}
    assert errors["notes.txt"].startswith("not an image file") and "Error" in errors["broken.jpg"]
    assert "predicted 3 images" in proc.stdout and "2 files not predicted" in proc.stdout


def test_two_processes_write_the_same_predictions(run, toy_root, tmp_path):
    listing = tmp_path / "test.txt"
    listing.write_text("\n".join(_test_paths(run, toy_root)[:7]) + "\n")  # 7: uneven slices
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert _run_in_process("predict.py", _args("--model", run, listing, "--output", one)).returncode == 0
    proc = run_script("predict.py", _args("--model", run, listing, "--output", two, "--batch-size", "2"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _rows(one), _rows(two)
    assert [(r["path"], r["class1"], r["class2"]) for r in a] == [(r["path"], r["class1"], r["class2"]) for r in b]
    np.testing.assert_allclose([float(r["prob1"]) for r in a], [float(r["prob1"]) for r in b], atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("no_best", "has no best checkpoint"),
    ("missing_input", "no such image, folder or list"),
    ("bad_output", "--output must name a .csv file"),
    ("missing_in_list", "which does not exist"),
])
def test_user_errors(run, tmp_path, case, message):
    model, inputs, output = run, [str(run / "report.md")], tmp_path / "o.csv"
    if case == "no_best":
        model = tmp_path / "unfinished"
        (model / "checkpoints").mkdir(parents=True)
    elif case == "missing_input":
        inputs = [str(tmp_path / "nope.jpg")]
    elif case == "bad_output":
        output = tmp_path / "o.txt"
    else:
        (tmp_path / "l.txt").write_text("gone.jpg\n")
        inputs = [str(tmp_path / "l.txt")]
    proc = _run_in_process("predict.py", _args("--model", model, *inputs, "--output", output))
    assert proc.returncode == 2 and message in last_error_line(proc)
    assert not output.exists()


def test_a_dataset_split_is_predicted_like_the_run_tested_it(run, toy_root, tmp_path):
    """--data.* --split test: the run's own test split (its order and ids), the run's logits."""
    out = tmp_path / "split.csv"
    proc = _run_in_process("predict.py", _args("--model", run, "--data.format", "cub", "--data.root", toy_root,
                                               "--split", "test", "--output", out, "--save-logits"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = np.load(run / "predictions.npz")
    assert [r["path"] for r in _rows(out)] == [str(i) for i in npz["image_ids"]]
    logits = np.array([json.loads(x)["logits"] for x in out.with_suffix(".jsonl").read_text().splitlines()])
    np.testing.assert_allclose(logits, npz["logits"], atol=1e-4)
    proc = _run_in_process("predict.py", _args("--model", run, "--data.format", "cub", "--data.root", toy_root,
                                               str(toy_root), "--output", out))
    assert proc.returncode == 2 and "not both" in last_error_line(proc)


def test_an_hf_dataset_split_is_predicted_from_its_rows(run, toy_root, tmp_path):
    """An HF `datasets` imagefolder: its rows (in-memory images, no files) give the same logits as the
    image files they were made from."""
    pytest.importorskip("datasets")
    files = _test_paths(run, toy_root)[:4]
    for k, f in enumerate(files):
        target = tmp_path / "hf" / "test" / f"class{k % 2}" / f"img{k}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    (tmp_path / "hf" / "train").mkdir()
    shutil.copytree(tmp_path / "hf" / "test", tmp_path / "hf" / "train", dirs_exist_ok=True)
    rows, direct = tmp_path / "rows.csv", tmp_path / "direct.csv"
    proc = _run_in_process("predict.py", _args("--model", run, "--data.format", "hf", "--data.root", tmp_path / "hf",
                                               "--split", "test", "--output", rows, "--save-logits"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _run_in_process("predict.py", _args("--model", run, *files, "--output", direct,
                                               "--save-logits")).returncode == 0
    load = lambda p: sorted(tuple(np.round(json.loads(x)["logits"], 4))  # noqa: E731
                            for x in p.with_suffix(".jsonl").read_text().splitlines())
    assert len(load(rows)) == 4 and np.allclose(load(rows), load(direct), atol=2e-4)
    assert all(r["path"].startswith("test/") for r in _rows(rows))
