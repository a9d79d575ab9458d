#!/usr/bin/env python
"""Start-up wall time of scripts/train_classifier.py: ``--help``, and process start to first training step.

    .venv/bin/python bench/startup.py                   # 3 timed runs of each command (after 1 untimed warm-up)
    .venv/bin/python bench/startup.py --repeats 5
    .venv/bin/python bench/startup.py --launch          # also under accelerate launch (accelerate_configs/cpu.yaml)

Every command runs as a fresh subprocess of the same Python (``sys.executable``) from the
repository root; its wall time is measured from just before the process is started to just
after it has ended. The baseline, measured in the same run and interleaved with the others,
is ``python -c "import torch"``; the table prints each command's ratio to it.

* ``train_classifier.py --help``: parse the flags and print the help (issue target: under 3 s);
  a run counts only if it exits 0 with the script's ``usage: train_classifier.py`` text.
* ``first training step``: a tiny run on the generated toy dataset
  (``--model.name test_efficientnet_gn --model.pretrained false --data.image_size 32
  --data.num_workers 0 --train.progress false --train.epochs 1 --train.batch_size 8
  --data.toy_num_classes 4 --data.toy_train_per_class 10 --data.toy_test_per_class 5
  --data.toy_image_size 32``, a fresh ``--train.output_dir`` per run, ``FGCLF_CACHE`` in a
  temporary folder) with ``FGCLF_DEBUG_KILL_AT_STEP=1``: the script's test hook SIGKILLs the
  process right after optimizer update 1, so the wall time is start -> first update done. The
  process therefore *exits non-zero by design* (killed by SIGKILL: return code -9; under
  ``accelerate launch`` the launcher exits 1 and names SIGKILL); any other ending is reported as
  an error. It includes imports, config, toy-data loading, model build, accelerator and
  TensorBoard set-up, the run directory and one training step.

``--warmup`` untimed runs of every command go first (default 1): the first one generates the
toy dataset into the temporary cache and fills the OS file cache, which later runs reuse (a
user's very first run also pays the dataset generation; ``--warmup 0`` includes it in the
first timed run). ``HF_HUB_OFFLINE=1`` is set unless the environment sets it already.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgclf.report import markdown_table  # noqa: E402

HELP_TARGET_S = 3.0
TINY_RUN = [
    "--model.name", "test_efficientnet_gn", "--model.pretrained", "false", "--data.image_size", "32",
    "--data.num_workers", "0", "--train.progress", "false", "--train.epochs", "1", "--train.batch_size", "8",
    "--data.toy_num_classes", "4", "--data.toy_train_per_class", "10", "--data.toy_test_per_class", "5",
    "--data.toy_image_size", "32",
]
BASELINE = 'python -c "import torch"'


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each command")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    p.add_argument("--launch", action="store_true", help="also time both under accelerate launch (cpu.yaml)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one run counts as failed")
    return p.parse_args(argv)


class BenchError(RuntimeError):
    pass


def _commands(args) -> list[tuple[str, list[str], dict, str]]:
    """(label, argv, extra env, expected ending) per measured command; argv may hold {run} for a fresh dir."""
    py, script = sys.executable, str(REPO / "scripts" / "train_classifier.py")
    kill_env = {"FGCLF_DEBUG_KILL_AT_STEP": "1"}
    run = [*TINY_RUN, "--train.output_dir", "{run}"]
    cmds = [(BASELINE, [py, "-c", "import torch"], {}, "ok"),
            ("train_classifier.py --help", [py, script, "--help"], {}, "help"),
            ("train_classifier.py: start -> first training step", [py, script, *run], kill_env, "killed")]
    if args.launch:
        launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                  str(REPO / "accelerate_configs" / "cpu.yaml"), script]
        cmds += [("accelerate launch ... --help", [*launch, "--help"], {}, "help"),
                 ("accelerate launch ...: start -> first training step", [*launch, *run], kill_env, "launch_killed")]
    return cmds


def _time_one(argv: list[str], env: dict, expect: str, timeout: float) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    ok = {"ok": proc.returncode == 0,
          "help": proc.returncode == 0 and "usage: train_classifier.py" in proc.stdout,  # the script's own help
          "killed": proc.returncode == -signal.SIGKILL,
          "launch_killed": proc.returncode != 0 and "SIGKILL" in proc.stderr}[expect]
    if not ok:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(f"{' '.join(argv[:4])} ... ended with return code {proc.returncode} "
                         f"(expected {expect}):\n  " + "\n  ".join(tail))
    return wall


def measure(args) -> dict[str, list[float]]:
    """Wall times (s) per command label, runs interleaved command by command."""
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fgclf_startup_bench_") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "FGCLF_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO)}
        env.setdefault("HF_HUB_OFFLINE", "1")
        cmds = _commands(args)
        counter = 0
        for i in range(args.warmup + args.repeats):
            for label, argv, extra, expect in cmds:
                counter += 1
                argv = [a.replace("{run}", str(tmp / f"run{counter}")) for a in argv]
                wall = _time_one(argv, {**env, **extra}, expect, args.timeout)
                if i >= args.warmup:
                    times.setdefault(label, []).append(wall)
            if i >= args.warmup:
                print(f"  run {i - args.warmup + 1}/{args.repeats}: "
                      + ", ".join(f"{t[-1]:.2f} s" for t in times.values()), flush=True)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    print(f"python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs; {args.repeats} timed runs "
          f"of each command after {args.warmup} warm-up run(s)", flush=True)
    try:
        times = measure(args)
    except (BenchError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    base = statistics.median(times[BASELINE])
    rows = []
    for label, t in times.items():
        med = statistics.median(t)
        note = ""
        if label == "train_classifier.py --help":  # the target is for the plain call
            note = f"target < {HELP_TARGET_S:.0f} s: {'met' if med < HELP_TARGET_S else 'missed'}"
        rows.append((label, f"{med:.2f}", f"{min(t):.2f}-{max(t):.2f}", f"{med / base:.2f}x", note))
    header = ("what", "median s", "spread (min-max) s", "ratio vs `import torch`", "target")
    print()
    print(markdown_table(header, rows))
    print("\n(the first-step runs end by SIGKILL from FGCLF_DEBUG_KILL_AT_STEP=1, a non-zero exit by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
