"""ensemble_eval: every combination rule and diversity number against a hand computation."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import math

import numpy as np
import pytest
from conftest import REPO, TINY_ARGS, run_script

from fgclf.errors import UserError


def _script():
    spec = importlib.util.spec_from_file_location("ensemble_eval_script", REPO / "scripts" / "ensemble_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _member(path: Path, logits, labels, val_top1, ids, val_loss=1.0):
    path.mkdir(parents=True)
    np.savez_compressed(path / "predictions.npz", logits=np.asarray(logits, np.float32), labels=labels,
                        class_names=np.array(["a", "b", "c"]), image_ids=np.array(ids))
    (path / "metrics.json").write_text(json.dumps({"best_epoch": 2}))
    (path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/top1": 0.1, "val/loss": 0.2}) + "\n"
                                        + json.dumps({"epoch": 2, "val/top1": val_top1, "val/loss": val_loss}) + "\n")
    return path


def test_every_rule_and_diversity_equal_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    labels = rng.integers(0, 3, n)
    ids = [f"img{i}" for i in range(n)]
    logits = [rng.normal(size=(n, 3)) * 2 + np.eye(3)[labels] * k for k in (1.0, 2.0, 0.5)]
    vals, losses = [0.5, 0.8, 0.3], [1.05, 0.95, 1.4]
    paths = [_member(tmp_path / f"m{i}", logits[i], labels, vals[i], ids, losses[i]) for i in range(3)]
    out = tmp_path / "ens"
    assert _script().main([*map(str, paths), "--output-dir", str(out)]) == 0
    result = json.loads((out / "ensemble.json").read_text())
    logits32 = [np.asarray(z, np.float32).astype(np.float64) for z in logits]
    probs = [_softmax(z) for z in logits32]
    preds = [z.argmax(1) for z in logits32]
    mean_prob = np.mean(probs, 0)
    w = np.exp(-np.array(losses) / 0.1) / np.exp(-np.array(losses) / 0.1).sum()  # softmax(-val loss / T)
    votes = sum(np.eye(3)[p] for p in preds)
    vote_pred = np.array([max(range(3), key=lambda c: (votes[i, c], mean_prob[i, c])) for i in range(n)])
    expected = {"mean_prob": mean_prob.argmax(1), "mean_logit": np.mean(logits32, 0).argmax(1),
                "val_weighted": sum(wi * p for wi, p in zip(w, probs)).argmax(1), "vote": vote_pred}
    for method, pred in expected.items():
        assert result["ensembles"][method]["top1"] == pytest.approx((pred == labels).mean()), method
        npz = np.load(out / f"predictions_{method}.npz")
        assert (npz["probs"].argmax(1) == pred).all() and list(npz["image_ids"]) == ids
    for i, p in enumerate(paths):
        assert result["members"][p.name]["top1"] == pytest.approx((preds[i] == labels).mean())
        assert result["val_top1"][p.name] == vals[i]  # the best epoch's validation top-1
        assert result["val_loss"][p.name] == losses[i]  # and its validation loss, not epoch 1's
    assert list(result["val_weights"].values()) == pytest.approx(w.tolist(), rel=1e-12)
    d = result["diversity"]
    assert d["oracle_top1"] == pytest.approx(np.mean([any(p[i] == labels[i] for p in preds) for i in range(n)]))
    assert d["disagreement"][0][1] == pytest.approx((preds[0] != preds[1]).mean())
    e0, e2 = (preds[0] != labels).astype(float), (preds[2] != labels).astype(float)
    assert d["error_correlation"][0][2] == pytest.approx(np.corrcoef(e0, e2)[0, 1])
    assert result["member_summary"]["top1"]["mean"] == pytest.approx(np.mean([(p == labels).mean() for p in preds]))
    assert "oracle" in (out / "ensemble.md").read_text().lower()


def test_val_weights_separate_members_and_follow_the_temperature(tmp_path):
    from fgclf.ensemble import combine, load_run_member, val_weights

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 30)
    # three seeds: validation top-1 nearly equal (raw top-1 weights 0.34/0.34/0.32), losses apart
    members = [load_run_member(_member(tmp_path / f"s{i}", rng.normal(size=(30, 3)), labels, top1, list(range(30)),
                                       loss))
               for i, (top1, loss) in enumerate([(0.40, 1.00), (0.41, 1.10), (0.38, 1.30)])]
    w = val_weights(members)  # T = 0.1: exp(0), exp(-1), exp(-3), normalised
    assert w == pytest.approx(np.array([1, math.exp(-1), math.exp(-3)]) / (1 + math.exp(-1) + math.exp(-3)))
    assert w[0] > 0.7 and w[2] < 0.04  # separated, where raw top-1 gave about 1/3 each
    assert val_weights(members, 1e-3) == pytest.approx([1, 0, 0], abs=1e-12)  # T -> 0: the best member
    assert val_weights(members, 1e6) == pytest.approx([1 / 3] * 3, rel=1e-5)  # T -> inf: mean_prob
    np.testing.assert_allclose(combine(members, "val_weighted", temperature=1e6), combine(members, "mean_prob"),
                               rtol=1e-5)
    members[1].val_loss = None
    with pytest.raises(UserError, match="validation loss.*s1"):
        val_weights(members)
    out = tmp_path / "ens"
    assert _script().main([str(tmp_path / "s0"), str(tmp_path / "s2"), "--temperature", "0.5",
                           "--output-dir", str(out)]) == 0
    result = json.loads((out / "ensemble.json").read_text())
    expected = np.exp(-np.array([1.0, 1.3]) / 0.5) / np.exp(-np.array([1.0, 1.3]) / 0.5).sum()
    assert list(result["val_weights"].values()) == pytest.approx(expected.tolist())
    assert "T = 0.5 nats" in (out / "ensemble.md").read_text()


def test_members_must_share_the_test_images(tmp_path, capsys):
    labels = np.array([0, 1, 2, 0])
    a = _member(tmp_path / "a", np.eye(3)[labels], labels, 0.5, ["1", "2", "3", "4"])
    b = _member(tmp_path / "b", np.eye(3)[labels], labels, 0.5, ["1", "2", "4", "3"])
    assert _script().main([str(a), str(b), "--output-dir", str(tmp_path / "o")]) == 2
    assert "other test image ids" in capsys.readouterr().err
    assert _script().main([str(a), "--output-dir", str(tmp_path / "o")]) == 2
    assert "at least two members" in capsys.readouterr().err
    assert _script().main([str(a), str(b), "--bogus"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_three_seeds_of_a_toy_run_and_a_checkpoint_member(toy_root, tmp_path):
    runs = []
    for seed in (1, 2, 3):
        out = tmp_path / f"seed{seed}"
        tta = ["--train.tta_flip", "true"] if seed == 1 else []  # its predictions.npz average flipped logits
        proc = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
                                                  "--train.epochs", "1", "--optim.lr", "0.01", "--train.seed", str(seed),
                                                  "--train.output_dir", str(out), *tta])
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(out)
    ens = tmp_path / "ens"
    assert _script().main([*map(str, runs), "--methods", "mean_prob", "val_weighted", "--output-dir", str(ens)]) == 0
    result = json.loads((ens / "ensemble.json").read_text())
    npz = [np.load(r / "predictions.npz") for r in runs]
    mean_prob = np.mean([_softmax(z["logits"].astype(np.float64)) for z in npz], 0)
    assert result["ensembles"]["mean_prob"]["top1"] == pytest.approx((mean_prob.argmax(1) == npz[0]["labels"]).mean())
    # a checkpoint folder is evaluated on the --data test split with its run's flip TTA: the same logits
    # the run saved, and the validation loss the run logged
    from fgclf.config import DataConfig

    data = DataConfig(format="cub", root=str(toy_root), num_workers=0)
    ckpt = _script().checkpoint_member(runs[0] / "checkpoints" / "best", data, 16)
    assert ckpt.tta_flip is True
    np.testing.assert_allclose(ckpt.logits, npz[0]["logits"], atol=1e-4)
    assert list(ckpt.image_ids) == list(npz[0]["image_ids"])
    logged = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()][-1]
    assert ckpt.val_loss == pytest.approx(logged["val/loss"], rel=1e-4)
    assert ckpt.val_top1 == pytest.approx(logged["val/top1"])
    plain = _script().checkpoint_member(runs[0] / "checkpoints" / "best", data, 16, tta_flip=False)
    assert np.abs(plain.logits - npz[0]["logits"]).max() > 1e-3  # without TTA the logits differ: the check bites
    # the val_weighted weights of the run directories come from their logged validation losses
    losses = np.array([[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()][-1]["val/loss"]
                       for r in runs])
    w = np.exp(-(losses - losses.min()) / 0.1)
    assert list(result["val_weights"].values()) == pytest.approx((w / w.sum()).tolist())
    assert list(result["tta_flip"].values()) == [True, False, False]
    # given as a checkpoint, seed 1 scores as its run directory does (same TTA), so the ensemble is unchanged
    ens2 = tmp_path / "ens2"
    assert _script().main([str(runs[0] / "checkpoints" / "best"), *map(str, runs[1:]), "--methods", "mean_prob",
                           "--data.format", "cub", "--data.root", str(toy_root), "--data.num_workers", "0",
                           "--output-dir", str(ens2)]) == 0
    again = json.loads((ens2 / "ensemble.json").read_text())
    assert again["ensembles"]["mean_prob"] == pytest.approx(result["ensembles"]["mean_prob"], abs=1e-5)
    assert list(again["tta_flip"].values()) == [True, False, False]
