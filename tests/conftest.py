"""Shared fixtures: a private fgclf cache, a tiny generated CUB-layout dataset, script runners."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
if not Path(ACCELERATE).exists():  # a python whose launcher lives elsewhere on PATH (a machine's own image)
    ACCELERATE = shutil.which("accelerate") or ACCELERATE
# the repository first, then what the environment already puts on the path (bench/gpu_check.sh's wheels)
REPO_PYTHONPATH = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

# tiny, fast settings shared by the script integration tests (no BatchNorm: GroupNorm model)
TINY_ARGS = [
    "--model.name", "test_efficientnet_gn", "--model.pretrained", "false",
    "--data.image_size", "32", "--data.num_workers", "0", "--train.progress", "false",
    "--train.batch_size", "8", "--train.log_every", "1",
]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Point FGCLF_CACHE (datasets, converted weights) at a per-session folder."""
    path = tmp_path_factory.mktemp("fgclf_cache")
    os.environ["FGCLF_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return path


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A small toy dataset in CUB layout: 4 classes, 10 train + 5 test images each, 32 px."""
    from fgclf.data import generate_toy_cub

    return generate_toy_cub(tmp_path_factory.mktemp("toy") / "toy_cub", num_classes=4, train_per_class=10,
                            test_per_class=5, image_size=32, seed=0)


# A single-process run without extra environment goes through the script's ``main(argv)`` in this
# process: a subprocess would pay ~10 s of imports per run and prove nothing more (the scripts'
# entry points are ``exit_process(main())``). FGCLF_TEST_SUBPROCESS=1 runs every script as a subprocess.
IN_PROCESS = os.environ.get("FGCLF_TEST_SUBPROCESS", "") != "1"


@functools.lru_cache(maxsize=None)
def _script_module(script: str):
    spec = importlib.util.spec_from_file_location(f"_inproc_{Path(script).stem}", REPO / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next run may choose other settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _run_in_process(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``scripts/<script>``'s ``main(args)`` here, with what a subprocess would give: exit status
    (an uncaught exception: 1 with its traceback on stderr), stdout and stderr."""
    module = _script_module(script)
    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = [str(REPO / "scripts" / script), *args]  # recorded as the run's command
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main(list(args))
            except SystemExit as exc:  # argparse (--help, bad flags) and explicit exits
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 -- a crash, as a subprocess would report it
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        _reset_accelerate()
    return subprocess.CompletedProcess([PYTHON, script, *args], code or 0, out.getvalue(), err.getvalue())


def run_script(script: str, args: list[str], *, nproc: int = 1, launch: bool = False, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>``: in this process (nproc=1, no launcher, no extra environment),
    directly as a subprocess (with ``env``: fault injection kills or signals its process) or under
    ``accelerate launch`` (gloo on CPU)."""
    if nproc == 1 and not launch and not env and IN_PROCESS:
        return _run_in_process(script, [str(a) for a in args])
    full_env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, **(env or {})}
    target = [str(REPO / "scripts" / script), *args]
    if nproc > 1:
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--main_process_port", "0",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target]
    elif launch:
        cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), *target]
    else:
        cmd = [PYTHON, *target]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` line a script printed (or the stderr tail when there is none)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    return lines[-1] if lines else proc.stderr[-2000:]


def assert_metrics_match_sklearn(run_dir: Path, *, num_classes: int, num_samples: int):
    """metrics.json equals scikit-learn recomputed from predictions.npz (1e-6); returns the npz."""
    import json

    import numpy as np
    from sklearn import metrics as skm

    m = json.loads((run_dir / "metrics.json").read_text())
    npz = np.load(run_dir / "predictions.npz")
    y, probs = npz["labels"], npz["probs"]
    pred = probs.argmax(1)
    labels = range(num_classes)
    assert m["num_samples"] == len(y) == num_samples  # every test image exactly once
    assert abs(m["top1"] - skm.accuracy_score(y, pred)) < 1e-6
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", labels=labels, zero_division=0)
    assert abs(m["precision_macro"] - p) < 1e-6 and abs(m["recall_macro"] - r) < 1e-6
    assert abs(m["f1_macro"] - f) < 1e-6
    assert abs(m["auroc_macro"] - skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")) < 1e-6
    assert np.array_equal(np.array(m["confusion_matrix"]), skm.confusion_matrix(y, pred, labels=labels))
    return npz


def train_toy(toy_root: Path, out: Path, *extra: str, nproc: int = 1, launch: bool = False, env=None, check=True):
    """``train_classifier.py`` on the toy dataset with TINY_ARGS; asserts success when ``check``."""
    args = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
            "--train.output_dir", str(out), *extra]
    proc = run_script("train_classifier.py", args, nproc=nproc, launch=launch, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def export_model_and_test_images(run_dir: Path, toy_root: Path):
    """``file:<run>/checkpoints/best`` and the run's test images, built here from scratch."""
    import torch

    from fgclf.data import create_dataset, create_transform
    from fgclf.models import create_model

    best = run_dir / "checkpoints" / "best"
    meta = json.loads((best / "config.json").read_text())
    model = create_model(f"file:{best}", num_classes=meta["num_classes"]).eval()
    ds = create_dataset(format="cub", root=str(toy_root), split="test", val_fraction=0.15,
                        transform=create_transform(meta["data_config"], is_training=False))
    return model, torch.stack([ds[i][0] for i in range(len(ds))])


def export_logits(run_dir: Path, toy_root: Path):
    """Test-split logits of the run's ``best`` export, computed in this process."""
    import torch

    model, x = export_model_and_test_images(run_dir, toy_root)
    with torch.no_grad():
        return model(x).numpy()
