#!/usr/bin/env python
"""Training throughput at the operating point: fgclf end to end against the model-bound limit and timm's loader.

    .venv/bin/python bench/throughput.py                                   # lite0 + resnet50 + vit_small, 224 and 448
    .venv/bin/python bench/throughput.py --models resnet50 --sizes 448 --precision bf16 --decoders pil nvjpeg
    .venv/bin/python bench/throughput.py --models test_efficientnet --sizes 32 --batch-size 4 --steps 2   # tiny

For each model and crop size, the training step is AdamW on cross-entropy with the run's precision
(``--precision``, through accelerate) and memory format (``--channels-last``), one process:

- (a) **model-bound**: the step on one synthetic batch already on the device (the limit);
- (b) **fgclf**: ``train_classifier.py``'s own input path and engine: its ``build_loaders`` (the
  ImageFolder records, the ``basic`` train transform, per-sample seeds, the DataLoader with its
  workers, persistent) and ``fgclf.engine.train_one_epoch``, from JPEG files, for each ``--decoders``
  (``pil``, ``torchvision``, ``nvjpeg``: the GPU input path, CUDA only);
- (c) **timm**: ``timm.data.create_dataset`` + ``create_loader`` on the same folder (the same crop
  scale, ratio, flip and colour jitter; its prefetcher on CUDA) feeding the same step in a bare loop;
- **loader alone**: fgclf's and timm's training loaders iterated without the model, in images/s per
  worker process (the CPU cores an input pipeline needs per GPU follow from it);
- **eval**: the forward pass on synthetic batches (a) and through fgclf's eval loader and
  ``fgclf.engine.evaluate`` (b).

Rates are images/s over one epoch of ``--steps`` batches (the generated train split is exactly that:
a whole epoch, so no prefetched batches of a cut-short epoch are counted or wasted) after one warm-up
epoch (workers started, kernels chosen), median of ``--repeats``; evaluation runs over the test split
(a quarter as many images). (b)/(a) says how close fgclf gets to the limit and (b)/(c) how it does
against timm's loader, both measured in the same run. The JPEGs are generated at 500x375 px, quality
75 (CUB's typical size; smooth colour fields plus detail), in 4 classes.
On a CPU the model is the bottleneck and the ratios say little about GPUs; ``bench/gpu_check.sh``
runs the full table on a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgclf.report import markdown_table  # noqa: E402

COLOR_JITTER, SCALE, RATIO = 0.2, (0.35, 1.0), (3 / 4, 4 / 3)  # fgclf's `basic` preset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "resnet50", "vit_small_patch16_224"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--decoders", nargs="+", default=None, help="default: pil (and nvjpeg on CUDA)")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: fgclf's, 2)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here (bench/gpu_check.sh checks the goals)")
    return p.parse_args(argv)


def make_jpegs(root: Path, n: int, classes: int = 4) -> None:
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 255, (375 // 25, 500 // 25, 3), dtype=np.uint8)).resize((500, 375),
                                                                                                       Image.BICUBIC)
        detail = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
        for split in ("train", "test"):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < max(classes, n // 4):  # every class in the test split
                Image.blend(base, detail, 0.2).save(folder / f"{i:05d}.jpg", quality=75)


def _script():
    spec = importlib.util.spec_from_file_location("train_classifier_for_bench", REPO / "scripts" / "train_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up: workers, kernels, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


class Bench:
    """One model at one size: the accelerator, model and optimizer shared by every row."""

    def __init__(self, args, name: str, size: int, device: str, root: Path) -> None:
        import torch

        from fgclf.models import create_model
        from fgclf.optim import create_optimizer
        from fgclf.runtime import create_accelerator, set_run_dir

        self.args, self.name, self.size, self.root = args, name, size, root
        self.accelerator = create_accelerator(mixed_precision=args.precision, log_with=None)
        if device == "cpu" and self.accelerator.device.type != "cpu":
            raise SystemExit("error: --device cpu on a CUDA machine: set CUDA_VISIBLE_DEVICES=''")
        set_run_dir(self.accelerator, root / "run")
        torch.manual_seed(0)
        kwargs = {"img_size": size} if "vit" in name else {}
        model = create_model(name, num_classes=4, pretrained=False, **kwargs)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer(model, name="adamw", lr=1e-4, weight_decay=0.05)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.loss = torch.nn.CrossEntropyLoss()
        self.steps = args.steps
        self.n = args.steps * args.batch_size
        self.data_config = {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875,
                            "interpolation": "bicubic"}

    def step(self, x, y) -> None:
        with self.accelerator.autocast():
            loss = self.loss(self.model(x), y)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        import torch

        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    # (a) the limit
    def model_bound(self) -> tuple[float, float]:
        import torch

        x = torch.randn(self.args.batch_size, 3, self.size, self.size, device=self.accelerator.device)
        if self.args.channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (self.args.batch_size,), device=self.accelerator.device)

        def train() -> None:
            self.model.train()
            for _ in range(self.steps):
                self.step(x, y)
            self.sync()

        @torch.no_grad()
        def evaluate() -> None:
            self.model.eval()
            with self.accelerator.autocast():
                for _ in range(self.steps):
                    self.model(x)
            self.sync()
        return _rate(train, self.n, self.args.repeats), _rate(evaluate, self.n, self.args.repeats)

    # (b) fgclf's loaders and engine
    def fgclf_loaders(self, decoder: str):
        from fgclf.config import TrainClassifierConfig, parse_config
        from fgclf.data import load_records_from_config
        from fgclf.methods import StepParts, create_method

        script = _script()
        flags = ["--data.format", "imagefolder", "--data.root", str(self.root / "data"), "--data.val_fraction", "0",
                 "--data.image_size", str(self.size), "--data.decoder", decoder, "--train.batch_size",
                 str(self.args.batch_size), "--model.name", self.name, "--data.verify_images", "none"]
        if self.args.workers is not None:
            flags += ["--data.num_workers", str(self.args.workers)]
        cfg = parse_config(TrainClassifierConfig, flags, prog="bench")
        records, _ = load_records_from_config(cfg.data)
        method = create_method("plain", parts=StepParts(loss_fn=self.loss))
        model = self.accelerator.unwrap_model(self.model)
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                "crop_pct": 0.875, "interpolation": "bicubic"}
        splits, loaders, _, plans = script.build_loaders(cfg, records, model, method)
        return loaders, plans, method, cfg.data.num_workers

    def fgclf_rates(self, decoder: str) -> dict:
        from fgclf.data.device_input import DeviceTransform
        from fgclf.engine import EVAL_LOSS, FitOptions, TrainState, evaluate, train_one_epoch

        loaders, plans, method, workers = self.fgclf_loaders(decoder)
        train = self.accelerator.prepare_data_loader(loaders["train"])
        test = self.accelerator.prepare_data_loader(loaders["test"])
        train_in = DeviceTransform(plans["train"], self.accelerator.device) if plans else None
        eval_in = DeviceTransform(plans["eval"], self.accelerator.device) if plans else None
        options = FitOptions(progress=False, log_every=0, train_input=train_in)
        state = TrainState()

        def epoch() -> None:  # the first --steps batches of an epoch of the files
            state.step_in_epoch = 0
            train_one_epoch(self.accelerator, self.model, train, self.optimizer, _NoSchedule(),
                            method, state=state, options=options)
            self.sync()

        def evaluation() -> None:
            evaluate(self.accelerator, self.model, test, method=method, loss_fn=EVAL_LOSS,
                     **({"inputs": eval_in} if eval_in is not None else {}))
            self.sync()

        def loader_only() -> None:
            for batch in train:
                if train_in is not None:
                    train_in(batch[0])
            self.sync()
        return {"train": _rate(epoch, self.n, self.args.repeats),
                "eval": _rate(evaluation, len(test.dataset), self.args.repeats),
                "loader": _rate(loader_only, self.n, self.args.repeats) / max(1, workers), "workers": workers}

    # (c) timm's loader
    def timm_rates(self, workers: int) -> dict:
        import torch
        from timm.data import create_dataset, create_loader

        cuda = self.accelerator.device.type == "cuda"
        dataset = create_dataset("", root=str(self.root / "data" / "train"))
        loader = create_loader(dataset, input_size=(3, self.size, self.size), batch_size=self.args.batch_size,
                               is_training=True, use_prefetcher=cuda, scale=SCALE, ratio=RATIO, hflip=0.5,
                               color_jitter=COLOR_JITTER, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                               num_workers=workers, persistent_workers=workers > 0, pin_memory=cuda,
                               device=self.accelerator.device)

        def run(with_model: bool) -> None:
            self.model.train()
            for x, y in loader:
                x, y = x.to(self.accelerator.device), y.to(self.accelerator.device)
                if self.args.channels_last:
                    x = x.to(memory_format=torch.channels_last)
                if with_model:
                    self.step(x, y)
            self.sync()
        return {"train": _rate(lambda: run(True), self.n, self.args.repeats),
                "loader": _rate(lambda: run(False), self.n, self.args.repeats) / max(1, workers)}


class _NoSchedule:
    def step_update(self) -> None:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    decoders = args.decoders or (["pil", "nvjpeg"] if device == "cuda" else ["pil"])
    if "nvjpeg" in decoders and device != "cuda":
        print("error: --decoders nvjpeg needs CUDA", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch_size < 1:
        print("error: --steps and --batch-size must be >= 1", file=sys.stderr)
        return 2
    images = args.steps * args.batch_size
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else f", {os.cpu_count()} CPUs")
          + f"; precision {args.precision}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{images} train JPEGs 500x375 q75", flush=True)
    rows, per_core, records = [], [], []
    with tempfile.TemporaryDirectory(prefix="fgclf_throughput_") as name:
        root = Path(name)
        make_jpegs(root / "data", images)
        for model in args.models:
            for size in args.sizes:
                bench = Bench(args, model, size, device, root)
                limit, limit_eval = bench.model_bound()
                for decoder in decoders:
                    fg = bench.fgclf_rates(decoder)
                    workers = fg["workers"]
                    tm = bench.timm_rates(workers)
                    rows.append((model, str(size), decoder, f"{limit:.1f}", f"{fg['train']:.1f}", f"{tm['train']:.1f}",
                                 f"{fg['train'] / limit:.2f}", f"{fg['train'] / tm['train']:.2f}",
                                 f"{limit_eval:.1f}", f"{fg['eval']:.1f}", f"{fg['eval'] / limit_eval:.2f}"))
                    per_core.append((model, str(size), decoder, str(workers), f"{fg['loader']:.1f}", f"{tm['loader']:.1f}"))
                    records.append({"model": model, "size": size, "decoder": decoder, "limit": limit,
                                    "fgclf": fg["train"], "timm": tm["train"], "eval_limit": limit_eval,
                                    "eval_fgclf": fg["eval"], "loader_per_worker": fg["loader"],
                                    "timm_loader_per_worker": tm["loader"], "workers": workers})
                    print(f"  {model} {size} {decoder}: (b)/(a) {fg['train'] / limit:.2f}, "
                          f"(b)/(c) {fg['train'] / tm['train']:.2f}", flush=True)
                del bench
    print()
    print(markdown_table(("model", "size", "decoder", "(a) limit img/s", "(b) fgclf img/s", "(c) timm loader img/s",
                          "(b)/(a)", "(b)/(c)", "eval (a) img/s", "eval (b) img/s", "eval (b)/(a)"), rows))
    print()
    print(markdown_table(("model", "size", "decoder", "workers", "fgclf loader img/s per worker",
                          "timm loader img/s per worker"), per_core))
    if args.json:
        import json

        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
