"""Multi-level heads (``--model.hierarchy true``) and per-level metrics, against hand computations,
scikit-learn and a run on a tiny generated FGVC-Aircraft copy (8 variants, 4 families, 2 makers)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_ARGS, _run_in_process, last_error_line
from sklearn import metrics as skm

from fgclf.errors import UserError
from fgclf.methods import StepContext, StepParts, create_method
from fgclf.methods.hierarchy import HierarchyModel, levels_option
from fgclf.metrics import level_metrics

LEVELS = {"family": {"names": ["f0", "f1"], "of": [0, 0, 1, 1]},
          "maker": {"names": ["m0", "m1", "m2"], "of": [2, 0, 1, 1]}}


def _model(consistent=False):
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=4)
    return create_method("hierarchy", levels=LEVELS, consistent=consistent).build(backbone, 4).eval()


def test_heads_and_consistent_prediction():
    model = _model(consistent=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x, return_levels=True)
        joint = model(x)
    assert out["logits"].shape == (3, 4) and out["family"].shape == (3, 2) and out["maker"].shape == (3, 3)
    want = F.log_softmax(out["logits"], -1)
    for name, spec in LEVELS.items():
        want = want + F.log_softmax(out[name], -1)[:, spec["of"]]
    torch.testing.assert_close(joint, want)
    model.consistent = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), out["logits"])
    # the pooled features are the backbone's own pooling (what plain's classifier sees)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), backbone.eval()(x))


def test_loss_is_the_weighted_sum_over_levels():
    model = _model().train()
    method = create_method("hierarchy", levels=LEVELS, level_weight=0.3, parts=StepParts(loss_fn=torch.nn.CrossEntropyLoss()))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    out = method.training_step(model, (x, y), StepContext())
    torch.manual_seed(1)
    ref = model(x, return_levels=True)  # the same forward pass (train mode), the loss by hand
    want = F.cross_entropy(ref["logits"], y)
    for name, spec in LEVELS.items():
        want = want + 0.3 * F.cross_entropy(ref[name], torch.tensor(spec["of"])[y])
    torch.testing.assert_close(out.loss, want)
    assert set(out.terms) == {"fine", "level_family", "level_maker"}


def test_soft_targets_are_summed_per_coarse_class():
    method = create_method("hierarchy", levels=LEVELS)
    soft = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(method.level_targets(soft, "family"), torch.tensor([[0.7, 0.3], [0.3, 0.7]]))
    torch.testing.assert_close(method.level_targets(soft, "maker"), torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.7, 0.1]]))
    assert method.level_targets(torch.tensor([3, 0]), "maker").tolist() == [1, 2]


def test_level_metrics_equal_sklearn_on_summed_probabilities():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 4)), rng.integers(0, 4, 50)
    of = np.array(LEVELS["maker"]["of"])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    coarse = np.stack([probs[:, of == k].sum(1) for k in range(3)], 1)
    got = level_metrics(logits, labels, of=of, num_coarse=3)
    y = of[labels]
    assert got["top1"] == pytest.approx(skm.accuracy_score(y, coarse.argmax(1)))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, coarse.argmax(1), average="macro", labels=range(3),
                                                        zero_division=0))
    assert got["auroc_macro"] == pytest.approx(skm.roc_auc_score(y, coarse, multi_class="ovr", average="macro"))


def test_bad_levels():
    with pytest.raises(UserError, match="switched on by --model.hierarchy true"):
        create_method("hierarchy").build(timm.create_model("test_efficientnet", num_classes=4), 4)
    with pytest.raises(UserError, match="class 1 has no family"):
        create_method("hierarchy", levels={"family": {"names": ["a"], "of": [0, -1]}}).build(
            timm.create_model("test_efficientnet", num_classes=2), 2)


# ----------------------------------------------------------------------------- through train_classifier
@pytest.fixture(scope="module")
def aircraft(tmp_path_factory):
    from fgclf.data.layouts import write_layout

    return write_layout("fgvc_aircraft", tmp_path_factory.mktemp("aircraft"), num_classes=8, train_per_class=3,
                        val_per_class=1, test_per_class=2, image_size=48)


def _args(root, out, *extra):
    return ["--data.format", "fgvc_aircraft", "--data.root", str(root), "--data.merge_val", "true", *TINY_ARGS,
            "--model.name", "test_efficientnet", "--data.image_size", "48", "--data.aug.preset", "basic",
            "--train.epochs", "2", "--train.output_dir", str(out), *extra]


def test_hierarchy_run_reports_levels_and_exports(aircraft, tmp_path):
    from fgclf.data import load_records
    from fgclf.models import create_model

    run = tmp_path / "run"
    proc = _run_in_process("train_classifier.py", _args(aircraft, run, "--model.hierarchy", "true",
                                                        "--model.hierarchy_consistent", "true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "level family (4 classes): top1" in proc.stdout
    m = json.loads((run / "metrics.json").read_text())
    npz = np.load(run / "predictions.npz")
    rec = load_records(format="fgvc_aircraft", root=str(aircraft), merge_val=True, val_fraction=0.15)
    for name, (names, of) in rec.levels.items():  # metrics.json levels = sklearn on the summed probabilities
        of = np.array(of)
        coarse = np.stack([npz["probs"][:, of == k].sum(1) for k in range(len(names))], 1)
        assert m["levels"][name]["top1"] == pytest.approx(skm.accuracy_score(of[npz["labels"]], coarse.argmax(1)),
                                                          abs=1e-6)
    assert m["method"] == "hierarchy" and "## Coarser levels" in (run / "report.md").read_text()
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/fine", "train/level_family", "train/level_manufacturer"} <= set(history[-1])
    # the best export rebuilds the heads and the consistent prediction: the run's test logits
    best = run / "checkpoints" / "best"
    model = create_model(f"file:{best}", num_classes=8).eval()
    assert isinstance(model, HierarchyModel) and model.consistent
    from fgclf.data import create_dataset, create_transform

    meta = json.loads((best / "config.json").read_text())
    ds = create_dataset(format="fgvc_aircraft", root=str(aircraft), merge_val=True, split="test",
                        transform=create_transform(meta["data_config"], is_training=False))
    with torch.no_grad():
        logits = model(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()
    np.testing.assert_allclose(logits, npz["logits"], atol=1e-4)


def test_plain_run_on_a_dataset_with_levels_reports_them_too(aircraft, tmp_path):
    proc = _run_in_process("train_classifier.py", _args(aircraft, tmp_path / "plain", "--train.epochs", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert m["method"] == "plain" and set(m["levels"]) == {"family", "manufacturer"}


@pytest.mark.parametrize("extra,message", [
    (["--data.format", "cub"], "has no coarser label levels"),
    (["--method.name", "wsdan"], "model.hierarchy adds level heads to the plain model"),
    (["--loss.class_balance", "inverse"], "those weights are per fine class"),
    (["--loss.name", "focal", "--loss.alpha", "[1, 1, 1, 1, 1, 1, 1, 2]"], "those weights are per fine class"),
])
def test_hierarchy_user_errors(aircraft, toy_root, tmp_path, extra, message):
    args = _args(aircraft, tmp_path / "x", "--model.hierarchy", "true", *extra)
    if "cub" in extra:
        args[args.index("--data.root") + 1] = str(toy_root)
        args[args.index("--data.merge_val") + 1] = "false"
    proc = _run_in_process("train_classifier.py", args)
    assert proc.returncode == 2 and message in last_error_line(proc)
    assert not (tmp_path / "x").exists()


def test_levels_option_round_trip():
    assert levels_option({"a": (["x", "y"], [1, 0])}) == {"a": {"names": ["x", "y"], "of": [1, 0]}}


def test_a_new_class_count_is_refused():
    """Its level maps belong to its classes: an export cannot be fine-tuned on another class count."""
    model = _model()
    with pytest.raises(UserError, match="level heads belong to its 4 classes"):
        model.reset_classifier(5)
    model.reset_classifier(0)  # features only (extract_features) stays possible
    assert model(torch.randn(2, 3, 32, 32), return_levels=True)["logits"].shape[1] == model.num_features


def test_levels_file_gives_a_dataset_levels(toy_root, tmp_path):
    """A CSV of coarser labels per class (the toy set's beak and crown): read against the class names,
    errors name the line or the class, and compare_runs sees the levels as '<level>.<metric>'."""
    from fgclf.compare import load_run
    from fgclf.data import load_records
    from fgclf.data.toy import toy_classes

    levels_csv = REPO / "configs" / "toy_levels.csv"
    rec = load_records(format="cub", root=str(toy_root), levels_file=str(levels_csv), val_fraction=0)
    attrs = dict(toy_classes(12))
    for level in ("beak", "crown"):
        names, of = rec.levels[level]
        assert names == sorted({attrs[n.split(".", 1)[1]][level] for n in rec.class_names})
        assert [names[of[c]] for c in range(len(rec.class_names))] == [
            attrs[n.split(".", 1)[1]][level] for n in rec.class_names]
    bad = tmp_path / "bad.csv"
    bad.write_text("class,beak\n" + "\n".join(levels_csv.read_text().splitlines()[1:3]) + "\n")
    with pytest.raises(UserError, match="bad.csv line 2: expected 2 non-empty fields"):
        load_records(format="cub", root=str(toy_root), levels_file=str(bad))
    bad.write_text("class,beak\n001.Red_Crowned_Conebeak,cone\n")
    with pytest.raises(UserError, match=r"no row for class '002\.Spotted_Red_Crowned_Conebeak' \(and 2 more\)"):
        load_records(format="cub", root=str(toy_root), levels_file=str(bad))
    # through a run: metrics.json levels, and compare_runs' flattened keys (the 4 toy classes of this
    # fixture share beak and crown, a one-class level that is not reported: tail and breast here)
    tail = tmp_path / "tail.csv"
    tail.write_text("class,tail,breast\n" + "".join(f"{n},{attrs[n.split('.', 1)[1]]['tail']},"
                                                    f"{attrs[n.split('.', 1)[1]]['breast']}\n" for n in rec.class_names))
    proc = _run_in_process("train_classifier.py", ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
                                                   "--data.levels_file", str(tail), "--train.epochs", "1",
                                                   "--model.hierarchy", "true", "--train.output_dir",
                                                   str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(tmp_path / "run")
    assert run.metrics["tail.top1"] == run.metrics["levels"]["tail"]["top1"] and run.metrics["method"] == "hierarchy"
    assert set(run.metrics["levels"]) == {"tail", "breast"}


def test_shipped_cub_levels_file():
    """configs/cub_levels.csv (Chang et al. 2021's order and family of every CUB class) reads for CUB's
    200 class names: 13 orders, 38 families."""
    import csv

    from fgclf.data.formats import read_levels_file

    path = REPO / "configs" / "cub_levels.csv"
    names = [r[0] for r in csv.reader(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))][1:]
    assert names[0] == "001.Black_footed_Albatross" and names[-1] == "200.Common_Yellowthroat" and len(names) == 200
    assert [int(n[:3]) for n in names] == list(range(1, 201))
    levels = read_levels_file(path, names)
    assert {k: len(v[0]) for k, v in levels.items()} == {"order": 13, "family": 38}
    order, family = levels["order"], levels["family"]
    assert order[0][order[1][0]] == "Procellariiformes" and family[0][family[1][0]] == "Diomedeidae"
