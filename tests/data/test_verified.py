"""The record of verified images: a second check decodes only what changed, and never trusts a failure."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from fgclf.data import datasets
from fgclf.data.datasets import find_bad_images
from fgclf.data.verified import VerifiedFiles


def _images(folder, n=6):
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        Image.new("RGB", (40, 30), (i * 30, 10, 200)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _counting(monkeypatch):
    checked = []
    real = datasets._check_image

    def check(path, mode):
        checked.append(os.path.basename(path))
        return real(path, mode)
    monkeypatch.setattr(datasets, "_check_image", check)
    return checked


def test_second_check_decodes_only_changed_files_and_bad_ones_every_time(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img")
    broken = tmp_path / "img" / "broken.jpg"
    broken.write_bytes(open(paths[0], "rb").read()[:200])  # truncated
    paths.append(str(broken))
    record = VerifiedFiles(tmp_path / "verified.db", settle_s=0)
    checked = _counting(monkeypatch)

    first = find_bad_images(paths, mode="full", record=record)
    assert [os.path.basename(p) for p, _ in first] == ["broken.jpg"] and len(checked) == 7
    assert first == find_bad_images(paths, mode="full")  # the same answer as without a record

    checked.clear()
    assert find_bad_images(paths, mode="full", record=record) == first
    assert checked == ["broken.jpg"]  # a failure is never recorded: checked again

    checked.clear()  # a file rewritten (corrupted) after it passed: its ctime changed, so it is checked again
    data = open(paths[2], "rb").read()
    with open(paths[2], "wb") as f:
        f.write(data[:150])
    again = find_bad_images(paths, mode="full", record=record)
    assert sorted(checked) == ["2.jpg", "broken.jpg"]
    assert sorted(os.path.basename(p) for p, _ in again) == ["2.jpg", "broken.jpg"]


def test_a_header_pass_does_not_stand_for_a_full_decode(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img", n=3)
    record = VerifiedFiles(tmp_path / "verified.db", settle_s=0)
    checked = _counting(monkeypatch)
    find_bad_images(paths, mode="header", record=record)
    checked.clear()
    find_bad_images(paths, mode="full", record=record)
    assert len(checked) == 3  # only opened before: decoded now
    checked.clear()
    find_bad_images(paths, mode="header", record=record)  # a full pass covers a header check
    assert checked == []


def test_an_unusable_record_checks_everything(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img", n=2)
    (tmp_path / "verified.db").write_text("not a database")
    checked = _counting(monkeypatch)
    assert find_bad_images(paths, mode="full", record=VerifiedFiles(tmp_path / "verified.db", settle_s=0)) == []
    assert len(checked) == 2


@pytest.mark.parametrize("mode", ["full", "header"])
def test_a_training_run_records_its_dataset(tmp_path, monkeypatch, mode):
    """load_records_from_config uses the record in the fgclf cache: the second load decodes nothing."""
    from fgclf.config import DataConfig
    from fgclf.data import load_records_from_config

    from fgclf.data import verified

    monkeypatch.setenv("FGCLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "SETTLE_S", 0.0)  # the dataset was generated a moment ago
    cfg = DataConfig(format="toy", toy_num_classes=3, toy_train_per_class=4, toy_test_per_class=2,
                     toy_image_size=32, verify_images=mode)
    load_records_from_config(cfg)
    assert (tmp_path / "cache" / "verified.db").is_file()
    checked = _counting(monkeypatch)
    load_records_from_config(cfg)
    assert checked == []


def test_a_file_changed_just_before_its_check_is_not_recorded(tmp_path, monkeypatch):
    """A same-size rewrite within one timestamp tick would look unchanged: files this new are checked
    again next time (the default 2 s settle)."""
    paths = _images(tmp_path / "img", n=2)
    record = VerifiedFiles(tmp_path / "verified.db")
    checked = _counting(monkeypatch)
    find_bad_images(paths, mode="full", record=record)
    checked.clear()
    find_bad_images(paths, mode="full", record=record)
    assert len(checked) == 2
