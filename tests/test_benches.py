"""The benchmarks in bench/ run end to end with tiny settings and print sane tables (no speed is asserted)."""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, REPO_PYTHONPATH

# tiny: a BatchNorm timm test model (running stats are compared too), 2 timed steps, 1 repeat
ENGINE_TINY = ["--model", "test_efficientnet", "--num-classes", "5", "--image-size", "32", "--batch-size", "8",
               "--steps", "2", "--repeats", "1", "--warmup-steps", "1", "--log-every", "1"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _table(out: str) -> dict[str, list[str]]:
    """Markdown table rows of ``out`` as {first cell: other cells} (header and rule skipped)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_engine_overhead_runs_and_variants_do_the_same_work(capsys):
    bench = _load("engine_overhead")
    assert bench.main(ENGINE_TINY) == 0
    out = capsys.readouterr().out
    table = _table(out)
    assert set(table) == set(bench.LABELS.values())
    for label, (rate, spread, ratio, ratio_spread) in table.items():
        lo, hi = (float(x) for x in spread.split("-"))
        assert float(rate) > 0 and 0 < lo <= float(rate) <= hi, label
        assert math.isfinite(float(ratio)) and float(ratio) > 0, label
    assert table[bench.LABELS["bare"]][2] == "1.000"
    engine = re.search(r"engine / bare = ([0-9.]+) \(target >= 0\.97", out)
    assert engine and math.isfinite(float(engine.group(1))) and float(engine.group(1)) > 0
    # the comparison is apples to apples: the engine, the bare loop and the accelerate loop end
    # with the same weights and BatchNorm statistics after the same batches
    same = re.search(r"fgclf vs bare = (\S+), accelerate vs bare = (\S+)", out)
    assert same, out
    assert float(same.group(1)) <= 1e-6 and float(same.group(2)) <= 1e-6, same.group(0)


def test_engine_overhead_weight_check_catches_different_work(monkeypatch):
    """A bare loop that decays every parameter (also norms and biases) ends elsewhere: the check sees it."""
    bench = _load("engine_overhead")
    monkeypatch.setattr(bench, "_decay_groups", lambda model, wd: [{"params": list(model.parameters()),
                                                                    "weight_decay": 0.5}])
    res = bench.run(bench.parse_args(ENGINE_TINY))
    assert res["global_step"] == 3
    assert all(len(r) == 1 and r[0] > 0 for r in res["rates"].values())
    assert bench._max_diff(res["models"]["fgclf"], res["models"]["bare"]) > 1e-5
    assert bench._max_diff(res["models"]["accelerate"], res["models"]["bare"]) == 0.0  # both use the patched groups


def test_startup_runs_and_reports_each_command(capsys):
    bench = _load("startup")
    assert bench.main(["--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    table = _table(out)
    assert list(table) == [bench.BASELINE, "train_classifier.py --help",
                           "train_classifier.py: start -> first training step"]
    for label, (median, spread, ratio, _target) in table.items():
        lo, hi = (float(x) for x in spread.split("-"))
        assert float(median) > 0 and lo <= float(median) <= hi, label
        assert math.isfinite(float(ratio.rstrip("x"))) and float(ratio.rstrip("x")) > 0, label
    assert table[bench.BASELINE][2] == "1.00x"
    assert re.match(r"target < 3 s: (met|missed)$", table["train_classifier.py --help"][3])


def test_startup_refuses_a_run_that_did_not_end_as_expected():
    """A process that exits normally where the kill hook should have fired is an error, not a number."""
    bench = _load("startup")
    with pytest.raises(bench.BenchError, match="expected killed"):
        bench._time_one([sys.executable, "-c", "pass"], {}, "killed", 60)
    with pytest.raises(bench.BenchError, match="expected help"):  # exit 0 but no usage text
        bench._time_one([sys.executable, "-c", "pass"], {}, "help", 60)
    with pytest.raises(bench.BenchError, match="expected ok"):
        bench._time_one([sys.executable, "-c", "import sys; sys.exit(3)"], {}, "ok", 60)


def test_method_cost_runs_every_step_and_reports_ratios_against_plain(capsys):
    bench = _load("method_cost")
    argv = ["--model", "test_efficientnet", "--methods", "plain", "bcnn", "pmg", "herbs", "--image-size", "64",
            "--batch-size", "8", "--steps", "1", "--repeats", "1"]
    assert bench.main(argv) == 0
    table = _table(capsys.readouterr().out)
    assert set(table) == {"plain", "bcnn", "pmg", "herbs"}
    assert table["plain"][2] == "1.00x" and table["plain"][4] == "1.00x"
    assert int(table["bcnn"][0].replace(",", "")) > int(table["plain"][0].replace(",", ""))  # its bilinear head


def test_optimizer_step_times_each_implementation_against_the_default(capsys):
    bench = _load("optimizer_step")
    argv = ["--models", "test_efficientnet", "--optimizers", "adamw", "sgd", "--steps", "2", "--repeats", "1",
            "--image-size", "32", "--batch-size", "4", "--train-steps", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| test_efficientnet")]
    steps = {(r[1], r[2]): r for r in rows if len(r) == 6}
    assert set(steps) == {(o, i) for o in ("adamw", "sgd") for i in ("loop (default)", "foreach", "fused")}
    for (opt, impl), r in steps.items():
        lo, hi = map(float, r[4].split("-"))
        assert lo <= float(r[3]) <= hi and float(r[3]) > 0
        if impl == "loop (default)":  # torch's choice for CPU tensors
            assert r[5] == "1.00"
        else:  # one repeat: the ratio is this row's time over the default's (both printed to 0.01 ms)
            ratio = float(r[3]) / float(steps[(opt, "loop (default)")][3])
            assert abs(float(r[5]) - ratio) <= 0.03 * ratio + 0.006, (r, ratio)
    train = {r[1]: r for r in rows if len(r) == 5}
    assert set(train) == {"default", "fused"} and train["default"][4] == "" and float(train["fused"][4]) > 0


def test_memory_format_trains_both_layouts_to_the_same_weights(capsys):
    bench = _load("memory_format")
    assert bench.main(["--models", "test_resnet", "--image-size", "32", "--batch-size", "4", "--steps", "1",
                       "--repeats", "2"]) == 0
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| test_resnet")]
    assert [r[1] for r in rows] == ["NCHW", "NHWC"]
    assert float(rows[1][4]) > 0 and float(rows[1][5]) < 1e-2  # the same steps: weights equal up to rounding


STUB_TRAIN = """import sys, time, pathlib
args = sys.argv[1:]
output = pathlib.Path(args[args.index("--output") + 1])
fgclf_ran = (output.parent / output.name.replace("timm", "fgclf")).is_dir()  # the fgclf run of the same pair
out = output / args[args.index("--experiment") + 1]
out.mkdir(parents=True)
time.sleep(0.5)
(out / "model_best.pth.tar").write_text("best")
open(__file__ + ".log", "a").write(f"train {time.time()} {fgclf_ran}\\n")
"""
STUB_VALIDATE = """import sys, time, pathlib
args = sys.argv[1:]
assert pathlib.Path(args[args.index("--checkpoint") + 1]).read_text() == "best"
assert args[args.index("--split") + 1] == "test"
time.sleep(0.3)
open(__file__ + ".log", "a").write("validate " + str(time.time()) + "\\n")
"""


def test_fixed_cost_phases_fit_in_the_wall_time_and_the_record_skips_the_decode(capsys, tmp_path):
    """bench/fixed_cost.py on a tiny run: every phase of timings.json is reported, the phases and the exit
    fit inside the measured wall time (they are parts of it), and the decode check's filled record is
    reported beside the no-record baseline. timm's side is two stand-in scripts (timm's repository is
    not installed): validate.py gets train.py's best checkpoint, the order alternates, and the ratios
    are the quotients of the printed times."""
    bench = _load("fixed_cost")
    (tmp_path / "train.py").write_text(STUB_TRAIN)
    (tmp_path / "validate.py").write_text(STUB_VALIDATE)
    assert bench.main(["--tiny", "--epochs", "1", "--repeats", "1", "--warmup", "1", "--verify", "12",
                       "--timm-train", str(tmp_path / "train.py")]) == 0
    out = capsys.readouterr().out
    trains = [line.split() for line in (tmp_path / "train.py.log").read_text().splitlines()]
    validates = (tmp_path / "validate.py.log").read_text().split()[1::2]
    assert len(trains) == len(validates) == 2 and all(float(t[1]) < float(v) for t, v in zip(trains, validates))
    assert [t[2] for t in trains] == ["True", "False"]  # fgclf first in the warm-up pair, timm first in the next
    ours = [float(line.split("fgclf ")[1].split(" s")[0]) for line in out.splitlines() if line.startswith("  run ")]
    table = _table(out)
    fgclf_s = float(table["fgclf train_classifier.py (train, test, report)"][0])
    assert ours == [pytest.approx(fgclf_s, abs=0.06)]  # one timed run (after the warm-up): the table's median
    timm_s = float(table["timm train.py + validate.py"][0])
    assert timm_s == pytest.approx(float(table["timm train.py"][0]) + float(table["timm validate.py (test split)"][0]),
                                   abs=0.02)
    line = next(x for x in out.splitlines() if x.startswith("fgclf / timm (train.py + validate.py), run by run"))
    assert float(line.split("median ")[1].split()[0]) == pytest.approx(fgclf_s / timm_s, rel=0.02)  # (2 decimals)
    phases = ["imports", "config", "accelerator", "data", "model", "setup", "first_update", "train", "test",
              "report", "shutdown", "exit"]
    assert [k for k in table if k in phases + ["total"]] == phases + ["total"]
    seconds = {k: float(table[k][0]) for k in phases + ["total"]}
    assert all(v >= 0 for v in seconds.values())
    assert sum(seconds[k] for k in phases) <= seconds["total"] + 0.05  # parts of one wall time (clock ticks)
    assert table["total"][2] == "100.0%"
    assert table["no record"][1] == "1.000x" and "filled record (next runs)" in table


def test_fixed_cost_gives_timm_the_same_images_and_recipe(tmp_path):
    """The timm side of the comparison: fgclf's own train, val and test images as an ImageFolder, a
    train.py command with the recipe's model, size, optimiser, schedule, batch and epochs, and a
    validate.py command over the test images with train.py's best checkpoint."""
    import os

    from fgclf.config import TrainClassifierConfig, parse_config
    from fgclf.data import load_records_from_config

    bench = _load("fixed_cost")
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH}
    root, classes = bench.toy_imagefolder(tmp_path / "folder", env, tiny=True)
    records, _ = load_records_from_config(parse_config(TrainClassifierConfig, ["--config", str(REPO / bench.RECIPE),
                                                                                *bench.TINY], prog="x").data)
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        files = sorted(p.resolve() for p in (root / folder).rglob("*.jpg"))
        assert files == sorted(Path(i).resolve() for i, s in zip(records.items, records.splits) if s == split)
    assert classes == len(records.class_names)
    args = bench.parse_args(["--timm-train", "train.py", "--epochs", "7"])
    cmd = bench.timm_command(args, root, classes, Path("w.safetensors"), tmp_path / "out")
    text = " ".join(cmd)
    for part in ("--model tf_efficientnet_lite0 --pretrained --pretrained-path w.safetensors", "--input-size 3 96 96",
                 "--opt adamw --lr 1e-3 --weight-decay 0.01 --sched cosine --epochs 7", "-b 32", "--workers 2",
                 f"--num-classes {classes}", "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5", "--experiment run"):
        assert part in text, part
    args.timm_validate = Path("validate.py")  # the test split, with train.py's best checkpoint
    text = " ".join(bench.timm_validate_command(args, root, classes, tmp_path / "out"))
    for part in ("validate.py --data-dir", "--split test --model tf_efficientnet_lite0", f"--num-classes {classes}",
                 f"--checkpoint {tmp_path / 'out' / 'run' / 'model_best.pth.tar'}", "--input-size 3 96 96",
                 "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5", "-b 32", "--workers 2"):
        assert part in text, part


def test_throughput_prints_each_path_and_its_ratios(capsys):
    """bench/throughput.py in its tiny configuration: the limit, fgclf's loaders and engine, timm's loader,
    and the ratios are the quotients of the printed rates (no speed is asserted)."""
    bench = _load("throughput")
    assert bench.main(["--models", "test_efficientnet", "--sizes", "32", "--batch-size", "4",
                       "--steps", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| test_efficientnet")]
    main, loaders = rows
    assert main[:3] == ["test_efficientnet", "32", "pil"]
    limit, fgclf, timm = (float(x) for x in main[3:6])
    assert min(limit, fgclf, timm) > 0
    assert float(main[6]) == pytest.approx(fgclf / limit, abs=0.01)
    assert float(main[7]) == pytest.approx(fgclf / timm, abs=0.01)
    assert loaders[3] == "1" and float(loaders[4]) > 0 and float(loaders[5]) > 0


def test_gpu_scripts_parse_and_refuse_an_unknown_section():
    """bench/gpu_check.sh runs only where a GPU is (not here): at least both GPU scripts are valid bash and
    the check refuses a section it does not have before it installs or runs anything."""
    import subprocess

    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "bench", "benchmarks"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown section 'benchmarks' (bench, tests, runs)" in proc.stderr
