#!/usr/bin/env python
r"""Train a fine-grained image classifier (timm backbone, accelerate loop).

Examples (each runs on CPU, 1 GPU or N GPUs by switching only the accelerate config):

    # the embedded toy dataset, offline-pretrained EfficientNet-Lite0, LoRA adapters
    accelerate launch scripts/train_classifier.py --peft lora
    # a shipped experiment config, with a CLI override
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train_classifier.py \
        --config configs/toy_effnetlite0_finetune.yaml --train.epochs 3
    # real CUB-200-2011 with hub weights (needs internet)
    accelerate launch scripts/train_classifier.py --data.root /data/CUB_200_2011 --data.format cub \
        --model.name resnet50.a1_in1k --model.pretrained true
    # the model split into 2 pipeline stages (one per GPU), 8 microbatches per batch, 1F1B
    accelerate launch --num_processes 2 scripts/train_classifier.py --model.name resnet50 --parallel pipeline \
        --pp.microbatches 8 --pp.schedule 1f1b
    # validate the dataset (manifests, every image decoded) and exit without training
    python scripts/train_classifier.py --data.root /data/CUB_200_2011 --data.format cub --check-data
    # continue an interrupted run (same command plus --resume)
    accelerate launch scripts/train_classifier.py --train.output_dir runs/demo --resume last

Writes runs/<name>/: config.yaml, metrics.jsonl, metrics.json, predictions.npz, report.html,
confusion_matrix.csv/.png, per_class.csv, curves.png, report.md, checkpoints/{last,best}.
Flags: ``--help`` lists all; precedence is defaults < ``--config`` YAML < CLI flags.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.timeline import Timeline  # noqa: E402  (first: the process start and the imports are timed)

_FIRST_CALL = [True]  # a second main() in one process (the tests) times from its own call
from fgclf.config import TrainClassifierConfig, parse_config, save_config, to_dict  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import (broadcast_from_main, check_resume_config, command_line, create_accelerator,  # noqa: E402
                           debug_aug_log, debug_callbacks, debug_loss, default_run_name, ignore_stop_signals,
                           prepare_run_dir, resolve_resume, script_main, seed_per_process, seed_shared, set_run_dir,
                           shutdown)


def validate(cfg: TrainClassifierConfig) -> None:
    """Reject impossible values and combinations before anything heavy starts."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= d.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
        (0 <= d.test_fraction < 1, "data.test_fraction must be in [0, 1)"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (d.prefetch_factor is None or d.prefetch_factor >= 1, "data.prefetch_factor must be >= 1"),
        (not (cfg.peft != "none" and cfg.model.strategy == "linear_probe"),
         "--peft and model.strategy=linear_probe exclude each other (PEFT already freezes the body)"),
        (cfg.resume is None or cfg.resume == "last" or Path(cfg.resume).exists(),
         f"--resume: no such checkpoint or run directory: {cfg.resume}"),
        (cfg.synthetic.dir is None or Path(cfg.synthetic.dir).is_dir(),
         f"--synthetic.dir: no such folder: {cfg.synthetic.dir}"),
        (cfg.synthetic.ratio >= 0 and cfg.synthetic.per_class >= 0, "synthetic.ratio and synthetic.per_class must be >= 0"),
        (not cfg.synthetic.only or cfg.synthetic.dir is not None, "synthetic.only needs --synthetic.dir"),
        (not cfg.model.hierarchy or cfg.method.name == "plain",
         f"model.hierarchy adds level heads to the plain model; method {cfg.method.name} has its own heads"),
        (not cfg.model.hierarchy or (cfg.loss.class_balance == "none" and not isinstance(cfg.loss.alpha, list)),
         "model.hierarchy with loss.class_balance or a per-class loss.alpha: those weights are per fine class; "
         "not supported yet"),
        (cfg.model.hierarchy_weight >= 0, "model.hierarchy_weight must be >= 0"),
        (cfg.method.name != "hierarchy" or cfg.model.name.startswith("file:"),
         "method hierarchy is switched on by --model.hierarchy true (its levels come from the dataset)"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0: off), got {t.ema_decay}"),
        (t.ema_decay == 0 or cfg.parallel == "data", "train.ema_decay needs --parallel data (a pipeline stage "
                                                     "holds only its part of the model)"),
        (not t.tta_flip or t.tta in ("none", "flip"), f"train.tta_flip true and train.tta {t.tta}: choose one "
                                                        "(ten_crop and multiscale include the mirror images)"),
        (cfg.model.unfreeze is None or (cfg.model.strategy == "full" and cfg.peft == "none"),
         "model.unfreeze schedules which stages train; use it with model.strategy full and no --peft"),
        (cfg.model.unfreeze is None or cfg.parallel == "data", "model.unfreeze needs --parallel data"),
        (t.sam_rho >= 0, f"train.sam_rho must be >= 0 (0: off), got {t.sam_rho}"),
        (t.sam_rho == 0 or cfg.parallel == "data", "train.sam_rho needs --parallel data"),
        (not t.sam_adaptive or t.sam_rho > 0, "train.sam_adaptive needs train.sam_rho > 0 (ASAM's radius, e.g. 0.5)"),
        (0 <= cfg.distill.alpha <= 1, f"distill.alpha must be in [0, 1], got {cfg.distill.alpha}"),
        (cfg.distill.temperature > 0, f"distill.temperature must be > 0, got {cfg.distill.temperature}"),
        (cfg.distill.teacher is None or Path(cfg.distill.teacher).exists(),
         f"--distill.teacher: no such run directory or model folder: {cfg.distill.teacher}"),
        (cfg.distill.teacher is None or cfg.parallel == "data", "--distill.teacher needs --parallel data"),
        (cfg.data.decoder != "nvjpeg" or (cfg.parallel == "data" and cfg.data.progressive is None),
         "--data.decoder nvjpeg makes one crop size on the device; it needs --parallel data and no data.progressive"),
    ]
    if cfg.parallel == "pipeline":  # what the pipeline runner does not do (yet), refused before any work
        p = cfg.pp
        checks += [
            (p.stages is None or p.stages >= 2, "pp.stages must be >= 2"),
            (p.microbatches >= 1 and t.batch_size % p.microbatches == 0,
             f"train.batch_size {t.batch_size} must be a multiple of pp.microbatches {p.microbatches}"),
            (cfg.peft == "none" and cfg.model.strategy == "full",
             "--parallel pipeline trains the whole model: no --peft, model.strategy=full"),
            (t.grad_accum_steps == 1, "--parallel pipeline accumulates over pp.microbatches; keep train.grad_accum_steps 1"),
            (cfg.mixup.alpha == 0 and cfg.mixup.cutmix_alpha == 0 and not cfg.loss.regularizer and not t.tta_flip
             and t.tta == "none" and cfg.loss.confusion is None,
             "--parallel pipeline does not support mixup, loss.regularizer, loss.confusion or train.tta(_flip) yet"),
            (cfg.method.name == "plain", f"--parallel pipeline splits a plain timm model; method {cfg.method.name} "
                                         "needs --parallel data"),
            (not cfg.model.hierarchy, "--parallel pipeline splits a plain timm model; model.hierarchy needs "
                                      "--parallel data"),
            (t.mixed_precision != "fp16", "--parallel pipeline supports bf16, not fp16"),
            (t.eval_batch_size in (None, t.batch_size), "--parallel pipeline evaluates in batches of train.batch_size"),
            (not t.compile, "--parallel pipeline does not support train.compile yet"),
            (cfg.data.progressive is None, "--parallel pipeline splits the model for one input size; no "
                                           "data.progressive"),
            (not t.sync_bn, "--parallel pipeline: train.sync_bn does not apply (each stage sees whole microbatches; "
                            "BatchNorm statistics are per microbatch)"),
            (t.drop_last, "--parallel pipeline always drops the last incomplete training batch; keep train.drop_last true"),
            (not o.name.lower().startswith(("lamb", "lars", "larc")),
             f"--parallel pipeline: optimizer {o.name} clips by its own global gradient norm, which one stage "
             "cannot see; use adamw/sgd with train.clip_grad_norm"),
        ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if cfg.model.unfreeze:
        from fgclf.unfreeze import parse_schedule

        parse_schedule(cfg.model.unfreeze)
    if cfg.data.decoder == "nvjpeg":  # augmentation the GPU path cannot run: refused before any work
        from fgclf.data.device_input import check_augment

        check_augment(cfg.data.aug)
    if cfg.data.progressive:
        from fgclf.data.progressive import parse_progressive

        parse_progressive(cfg.data.progressive)
    from fgclf.methods import method_from_config

    method = method_from_config(cfg.method)  # unknown method or an option of another method: refused here
    if "pk_batches" in method.requires:
        k = int(method.opts["samples_per_class"])
        if k < 2 or t.batch_size % k or t.batch_size // k < 2:
            raise UserError(f"method {method.name} trains on P classes x K images: train.batch_size {t.batch_size} must be "
                            f"a multiple of method.samples_per_class {k} (>= 2) with P = batch_size / K >= 2")
        if not t.drop_last:
            raise UserError(f"method {method.name}: P x K batches drop an incomplete last batch; keep train.drop_last true")
    if method.substeps > 1 and cfg.distill.teacher:
        raise UserError(f"method {method.name} takes {method.substeps} optimizer steps per batch on different views; "
                        "distillation compares the whole image's prediction with the teacher's: use --method.steps sum")
    if "image_size" in method.requires and cfg.data.progressive:
        raise UserError(f"method {method.name} is built for one image size (its stage sizes); no data.progressive")
    if method.substeps > 1 and t.grad_accum_steps > 1:
        raise UserError(f"method {method.name} takes {method.substeps} optimizer steps per batch; keep "
                        "train.grad_accum_steps 1 (or --method.steps sum)")
    if "hard_labels" in method.requires and (cfg.mixup.alpha > 0 or cfg.mixup.cutmix_alpha > 0):
        raise UserError(f"method {method.name} needs hard labels (its losses compare classes); turn mixup/cutmix off")
    if (cfg.loss.confusion is None) != (cfg.loss.confusion_weight is None):
        raise UserError("loss.confusion and loss.confusion_weight go together (e.g. --loss.confusion pairwise "
                        "--loss.confusion_weight 2; the authors suggest 0.1-0.2 x the number of classes)")
    from fgclf.losses import list_losses, list_regularizers
    from fgclf.optim import check_fused, list_optimizers, list_schedulers
    from fgclf.registry import unknown_name_message

    from fgclf.metrics import list_metrics

    for kind, name, known in (("early_stopping_metric", t.early_stopping_metric, ["loss", *list_metrics()]),
                              ("optimizer", o.name.lower(), list_optimizers()),
                              ("lr schedule", o.scheduler, list_schedulers()), ("loss", cfg.loss.name, list_losses()),
                              ("regularizer", cfg.loss.regularizer or "l2", list_regularizers())):
        if name not in known:
            raise UserError(unknown_name_message(kind, name, known))
    check_fused(o.name, o.fused)


def with_synthetic(cfg: TrainClassifierConfig, records):
    """The records with the chosen synthetic images in train (checked first), and what was added."""
    from fgclf.data import find_bad_images
    from fgclf.data.synthetic import add_synthetic, check_generator_split, load_synthetic, select_synthetic

    s = cfg.synthetic
    check_generator_split(s.dir, records)
    synthetic = load_synthetic(s.dir, class_names=records.class_names)
    real_train = [label for label, split in zip(records.labels, records.splits) if split == "train"]
    chosen, counts = select_synthetic(synthetic, real_train_labels=real_train, num_classes=len(records.class_names),
                                      ratio=s.ratio, per_class=s.per_class, seed=s.seed)
    if len(chosen) == 0:
        raise UserError(f"no synthetic images chosen from {s.dir} (synthetic.ratio {s.ratio}, per_class {s.per_class})")
    from fgclf.data.verified import VerifiedFiles

    bad = find_bad_images(chosen.items, mode=cfg.data.verify_images, record=VerifiedFiles())
    if bad:
        raise UserError(f"unreadable synthetic image {bad[0][0]}: {bad[0][1]}")
    info = {"dir": str(Path(s.dir).resolve()), "n_synthetic": len(chosen), "only": s.only,
            "per_class": {records.class_names[c]: {"wanted": w, "taken": t} for c, (w, t) in counts.items()}}
    return add_synthetic(records, chosen, only=s.only), info


def build_loaders(cfg: TrainClassifierConfig, records, model, method):
    """Transforms from the model's data config, one dataset per split, unprepared loaders."""
    import torch

    from fgclf import data as fd
    from fgclf.models import resolve_data_config

    d = cfg.data
    data_cfg = fd.input_config_for(d, resolve_data_config(model))
    train_tf = fd.create_transform(data_cfg, is_training=True, aug=d.aug)
    if d.progressive:  # the train crop size by epoch; evaluation stays at data_cfg's size
        from fgclf.data.progressive import ScheduledTransform, parse_progressive

        train_tf = ScheduledTransform(parse_progressive(d.progressive), lambda size: fd.create_transform(
            {**data_cfg, "input_size": (3, size, size)}, is_training=True, aug=d.aug))
    eval_tf = fd.create_transform(data_cfg, is_training=False)
    cache = None
    if d.cache:  # resized once, reused by every epoch, run and seed
        from fgclf.data.cache import ResizedImageCache, default_cache_dir, eval_resize_size

        cache = ResizedImageCache(d.cache_dir or default_cache_dir(), eval_resize_size(data_cfg),
                                  data_cfg.get("interpolation") or "bilinear")
        cache.check_space(records.items, records.bboxes)  # refuses a full disk; prints the size (main process)
    plans = None
    if d.decoder == "nvjpeg":  # workers read file bytes; the device decodes and augments (fgclf/data/device_input.py)
        from fgclf.data.device_input import EncodedImageDataset, plan_for

        plans = {"train": plan_for(data_cfg, is_training=True, aug=d.aug), "eval": plan_for(data_cfg, is_training=False)}
        splits = {s: EncodedImageDataset(fd.create_dataset(records=records, split=s, cache=cache),
                                         plans["train" if s == "train" else "eval"]) for s in ("train", "val", "test")}
    else:
        splits = {s: fd.create_dataset(records=records, split=s, transform=train_tf if s == "train" else eval_tf,
                                       cache=cache, decoder=d.decoder) for s in ("train", "val", "test")}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise UserError("the dataset needs at least one train and one test image")

    # each train sample is augmented from (seed, epoch, index): the same draws for any process or worker count
    # and after a resume, and different samples (so different draws) on different processes
    splits["train"] = fd.PerSampleSeeds(debug_aug_log(splits["train"]), seed=cfg.train.seed)
    workers = {"num_workers": d.num_workers}
    if plans is not None:
        from fgclf.data.device_input import collate_encoded

        workers["collate_fn"] = collate_encoded
    if d.num_workers:  # they ignore SIGTERM: an uncaught error must not leave the exit waiting for them
        from fgclf.runtime import kill_loader_workers_at_exit

        kill_loader_workers_at_exit()
        workers.update(worker_init_fn=ignore_stop_signals, persistent_workers=d.persistent_workers,
                       prefetch_factor=d.prefetch_factor)

    def loader(ds, bs, shuffle):  # shuffle: training (the last incomplete batch dropped unless drop_last false)
        return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=shuffle, drop_last=shuffle and cfg.train.drop_last,
                                           pin_memory=torch.cuda.is_available(), **workers)

    if cfg.train.drop_last and len(splits["train"]) < cfg.train.batch_size:
        raise UserError(f"the train split has {len(splits['train'])} images, fewer than train.batch_size "
                        f"{cfg.train.batch_size}, so every batch would be dropped; lower train.batch_size or set "
                        "train.drop_last false")
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    if "pk_batches" in method.requires:  # P classes x K images per batch (API-Net), same for any process count
        from fgclf.data.samplers import ClassBalancedBatchSampler

        k = int(method.opts["samples_per_class"])
        p = cfg.train.batch_size // k
        classes = len(set(splits["train"].targets))
        if p > classes:
            raise UserError(f"method {method.name}: train.batch_size {cfg.train.batch_size} / method.samples_per_class "
                            f"{k} = {p} classes per batch, but the train split has {classes}; lower train.batch_size")
        sampler = ClassBalancedBatchSampler(splits["train"].targets, classes_per_batch=p, samples_per_class=k,
                                            seed=cfg.train.seed)
        if len(sampler) == 0:
            raise UserError(f"method {method.name}: no batch of {p} classes x {k} images can be formed from the train "
                            "split; lower train.batch_size")
        train = torch.utils.data.DataLoader(splits["train"], batch_sampler=sampler,
                                            pin_memory=torch.cuda.is_available(), **workers)
    else:
        train = loader(splits["train"], cfg.train.batch_size, True)
    loaders = {"train": train,
               "val": loader(splits["val"], eval_bs, False) if len(splits["val"]) else None,
               "test": loader(splits["test"], eval_bs, False)}
    return splits, loaders, data_cfg, plans


def run_method(cfg: TrainClassifierConfig, levels: Optional[dict] = None):
    """The run's method; continuing from an export of the same method keeps the export's options
    (``fgclf.methods.method_for_run``), so the model, its step and the recorded options agree.
    ``levels``: the dataset's coarser label levels (``Records.levels``) for ``model.hierarchy``."""
    from fgclf.methods import method_for_run

    export = None
    if cfg.model.name.startswith("file:"):
        from fgclf.models import read_checkpoint_config

        export = read_checkpoint_config(cfg.model.name[len("file:"):])
    try:
        method = method_for_run(cfg.method, export=export)
    except UserError as err:
        raise UserError(f"{cfg.model.name}: {err}") from None
    if "image_size" in method.requires and method.opts.get("image_size") is None:  # PIM sizes its layers by it
        d = cfg.data
        method.opts["image_size"] = d.image_size or (d.toy_image_size if d.format == "toy" else None)
    if cfg.model.hierarchy:  # the plain model with one head per label level of the dataset
        from fgclf.methods import create_method
        from fgclf.methods.hierarchy import levels_option

        if not levels:
            raise UserError(f"model.hierarchy: data.format {cfg.data.format} has no coarser label levels "
                            "(fgvc_aircraft, nabirds and oxford_pets have)")
        method = create_method("hierarchy", levels=levels_option(levels), level_weight=cfg.model.hierarchy_weight,
                               consistent=cfg.model.hierarchy_consistent)
    return method


def build_model(cfg: TrainClassifierConfig, num_classes: int, method):
    """Backbone from the model factory, wrapped by the method, then the transfer strategy or PEFT adapters."""
    from fgclf.models import apply_peft, count_parameters, create_model
    from fgclf.transfer import apply_strategy, head_is_new, init_head

    m = cfg.model
    model_kwargs = {**m.kwargs, **{k: v for k, v in (("drop_rate", m.drop_rate), ("drop_path_rate", m.drop_path_rate),
                                                     ("attn_drop_rate", m.attn_drop_rate)) if v is not None}}
    exported = None
    if m.name.startswith("file:"):  # an export of this run must rebuild the same architecture (and method)
        from fgclf.models import read_checkpoint_config

        stored = read_checkpoint_config(m.name[len("file:"):])
        exported = (stored.get("method") or {}).get("name", "plain")
    model = create_model(m.name, num_classes=num_classes, pretrained=m.pretrained, weights=m.weights,
                         trust_remote_code=m.trust_remote_code, **model_kwargs)
    if hasattr(model, "export_kwargs"):  # an hf: model: its config, so that exports rebuild it without the hub
        model_kwargs = {**model.export_kwargs(), **model_kwargs}
    if exported is not None:
        model_kwargs = {**stored["model_kwargs"], **model_kwargs}
    pretrained_body = m.pretrained or m.weights is not None or exported is not None
    if method.name != "plain" and exported != method.name:  # a new method around the backbone: its head is new
        model = method.build(model, num_classes)
        if pretrained_body:
            init_head(model, m.head_init)
    elif head_is_new(model, name=m.name, pretrained=m.pretrained, weights=m.weights, num_classes=num_classes):
        init_head(model, m.head_init)  # never touches a trained head loaded from a file
    train_mode = apply_strategy(model, m.strategy, freeze_bn=m.freeze_bn)
    if m.unfreeze:  # the schedule checked against this model's stages now (applied after prepare)
        from fgclf.unfreeze import GradualUnfreeze

        GradualUnfreeze(model, m.unfreeze)
    peft_meta = None
    if cfg.peft != "none":
        lc = cfg.lora
        model = apply_peft(model, method=cfg.peft, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                           target_modules=lc.target_modules)
        peft_meta = {"method": cfg.peft, "r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout,
                     "target_modules": lc.target_modules}
    return model, train_mode, model_kwargs, peft_meta, count_parameters(model)


def build_parts(cfg: TrainClassifierConfig, train_labels: list[int], num_classes: int):
    """The step's parts (:class:`fgclf.methods.StepParts`): the loss with only the options the user set,
    mixup/cutmix, the optional weight penalty, the optional penalty on predictions and test-time flip."""
    import numpy as np

    from fgclf.data import create_mixup
    from fgclf.losses import class_balanced_weights, create_logit_penalty, create_loss, create_regularizer
    from fgclf.methods import StepParts

    lc = cfg.loss
    kwargs = {k: v for k, v in (("label_smoothing", lc.label_smoothing), ("gamma", lc.gamma),
                                ("alpha", lc.alpha)) if v is not None}
    if lc.class_balance != "none":
        counts = np.bincount(train_labels, minlength=num_classes)
        kwargs["class_weights"] = class_balanced_weights(counts, beta=lc.class_balance_beta, kind=lc.class_balance)
    regularizer = None
    if lc.regularizer:
        reg_kwargs = {"weight": lc.reg_weight, **({"p": lc.reg_p} if lc.reg_p is not None else {})}
        regularizer = create_regularizer(lc.regularizer, **reg_kwargs)
    mixup = create_mixup(mixup_alpha=cfg.mixup.alpha, cutmix_alpha=cfg.mixup.cutmix_alpha, prob=cfg.mixup.prob,
                         switch_prob=cfg.mixup.switch_prob, num_classes=num_classes)
    penalty = create_logit_penalty(lc.confusion, weight=lc.confusion_weight) if lc.confusion else None
    flip = cfg.train.tta_flip or cfg.train.tta == "flip"
    return StepParts(loss_fn=create_loss(lc.name, **kwargs), mixup=mixup, regularizer=regularizer,
                     logit_penalty=penalty, tta_flip=flip, tta="none" if flip else cfg.train.tta)


def method_pictures(accelerator, method, model, test_set, run_dir: Path, inputs=None) -> tuple:
    """The per-epoch picture of a method that draws one (WS-DAN/CAL attention maps and crops, TransFG's
    selected patches, NTS-Net's proposals, PIM's/HERBS' kept locations) on the first 8 test images, written to
    ``run_dir/<method>/epoch_NNN.png``; none for the others. ``inputs``: the GPU input path's eval transform."""
    if not hasattr(method, "draw"):
        return ()
    import torch

    samples = [test_set[i] for i in range(min(8, len(test_set)))]
    if inputs is not None:
        from fgclf.data.device_input import collate_encoded

        images = inputs(collate_encoded(samples)[0])
    else:
        images = torch.stack([x for x, _ in samples])
    folder = run_dir / method.name

    def draw(state) -> None:
        method.draw(accelerator, model, images, folder / f"epoch_{state.epoch:03d}.png")
    return (draw,)


@script_main
def main(argv: list[str] | None = None) -> int:
    # ---------------------------------------------------------------- config
    timeline = Timeline(from_process_start=_FIRST_CALL[0])
    _FIRST_CALL[0] = False
    timeline.mark("imports")
    script_run = argv is None  # a process of its own (not a call from the tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = "--check-data" in argv  # check the dataset (fgclf/data/check.py) and exit without training
    cfg = parse_config(TrainClassifierConfig, [a for a in argv if a != "--check-data"], prog="train_classifier.py",
                       description=__doc__)
    validate(cfg)
    if check_only:
        if os.environ.get("RANK", "0") != "0":  # under accelerate launch: the main process checks
            return 0
        from fgclf.data.check import run_check

        return run_check(cfg.data)
    output_dir, resume_dir = resolve_resume(cfg.resume, cfg.train.output_dir)
    timeline.mark("config")
    # ---------------------------------------------------------------- accelerator
    from fgclf import checkpoint as ck
    from fgclf.engine import EVAL_LOSS, FitOptions, StopTraining, TrainState, evaluate, fit
    from fgclf.methods import Method
    from fgclf.metrics import format_metrics_table
    from fgclf.optim import create_optimizer, create_scheduler
    from fgclf.report import read_jsonl, write_evaluation
    from fgclf import data as fd
    from fgclf.data import split_summary
    from fgclf.utils import atomic_write_json, atomic_write_text, package_versions

    t = cfg.train
    accelerator = create_accelerator(grad_accum_steps=t.grad_accum_steps, mixed_precision=t.mixed_precision,
                                     clip_grad_norm=t.clip_grad_norm, compile=t.compile)
    if cfg.data.decoder == "nvjpeg":
        from fgclf.data import device_input

        device_input.check_device(accelerator.device)
    for key, value in (("batch_size", t.batch_size), ("eval_batch_size", t.eval_batch_size or t.batch_size)):
        if value % accelerator.num_processes and cfg.parallel == "data":  # a pipeline's processes share batches
            raise UserError(f"train.{key} {value} must be divisible by the {accelerator.num_processes} processes")
    ds_plugin = accelerator.state.deepspeed_plugin
    if cfg.loss.regularizer and ds_plugin is not None and ds_plugin.deepspeed_config.get(
            "zero_optimization", {}).get("stage") == 3:  # each process would sum its empty parameter placeholders
        raise UserError(f"loss.regularizer {cfg.loss.regularizer} sums the whole weights, which ZeRO-3 splits across "
                        "processes; use ZeRO-2 or optim.weight_decay instead")
    if t.ema_decay and (accelerator.distributed_type.value == "FSDP" or ds_plugin is not None and ds_plugin.deepspeed_config.get(
            "zero_optimization", {}).get("stage") == 3):
        raise UserError("train.ema_decay averages the whole weights on every process, which ZeRO-3 and FSDP split "
                        "across processes; use DDP or ZeRO-2 (ZeRO-1/2 keep whole weights on every process)")
    if cfg.model.unfreeze and accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise UserError("model.unfreeze drops the frozen stages' gradients before each step, which DeepSpeed and "
                        "FSDP partition across processes; use DDP")
    if t.sam_rho and accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise UserError("train.sam_rho perturbs the weights by their whole gradient, which DeepSpeed and FSDP "
                        "partition across processes; use DDP")
    name = default_run_name(cfg.data.format, cfg.model.name.split("/")[-1], cfg.peft if cfg.peft != "none" else cfg.model.strategy)
    run_dir = Path(broadcast_from_main(accelerator, lambda: str(prepare_run_dir(
        output_dir, t.name, default_name=name, resuming=resume_dir is not None))))
    if resume_dir is not None:  # same settings as the run being continued, including its seed
        t.seed = broadcast_from_main(accelerator, lambda: check_resume_config(cfg, run_dir))
    elif t.seed == "random":  # drawn on the main process, shared, printed and recorded
        t.seed = broadcast_from_main(accelerator, lambda: secrets.randbelow(2**31 - 1))
        accelerator.print(f"random seed: {t.seed}")
    seed_shared(accelerator, t.seed)  # the same on every process: model init, splits, the sampler's shuffle
    timeline.mark("accelerator")
    # ---------------------------------------------------------------- data + model
    records, bad = broadcast_from_main(accelerator, lambda: fd.load_records_from_config(cfg.data))
    class_names = records.class_names
    synthetic = None
    if cfg.synthetic.dir:  # generated images join train only; val/test stay real
        records, synthetic = broadcast_from_main(accelerator, lambda: with_synthetic(cfg, records))
        short = [n for n, e in synthetic["per_class"].items() if e["taken"] < e["wanted"]]
        accelerator.print(f"synthetic: {synthetic['n_synthetic']} images from {synthetic['dir']}"
                          + (" (replacing the real train images)" if cfg.synthetic.only else "")
                          + (f"; fewer than wanted for {len(short)} classes" if short else ""))
    if "val" not in records.splits:
        for needs_val, what in ((cfg.optim.scheduler == "plateau", "optim.scheduler=plateau"),
                                (t.early_stopping_patience > 0, "train.early_stopping_patience > 0")):
            if needs_val:
                raise UserError(f"{what} needs a validation split; set data.val_fraction > 0")
    method = run_method(cfg, records.levels)
    timeline.mark("data")
    model, train_mode, model_kwargs, peft_meta, params = build_model(cfg, len(class_names), method)
    timeline.mark("model")
    if t.channels_last:  # convolutions then hand NHWC activations along; inputs are converted by the first
        import torch

        model = model.to(memory_format=torch.channels_last)
    if t.sync_bn:  # before prepare: DDP then wraps the synchronised layers
        from fgclf.models import convert_sync_batchnorm, count_batchnorms

        if not count_batchnorms(model):
            raise UserError(f"train.sync_bn: {cfg.model.name} has no BatchNorm layers")
        if accelerator.num_processes > 1:
            model = convert_sync_batchnorm(model, accelerator.device)
    splits, loaders, data_cfg, plans = build_loaders(cfg, records, model, method)
    if cfg.data.progressive:  # evaluation is at the run's size: the schedule grows up to it
        from fgclf.data.progressive import parse_progressive

        final = int(data_cfg["input_size"][-1])
        larger = [size for _, size in parse_progressive(cfg.data.progressive) if size > final]
        if larger:
            raise UserError(f"data.progressive: size {larger[0]} is above the evaluation size {final} "
                            "(data.image_size); the schedule grows up to it")
    body = getattr(model, "backbone", model)
    if cfg.data.progressive and hasattr(body, "patch_embed"):  # a ViT: sizes it can take

        if not getattr(body, "dynamic_img_size", False):
            raise UserError(f"data.progressive trains at several sizes; {cfg.model.name} takes one input size: pass "
                            "--model.kwargs '{\"dynamic_img_size\": true}' (timm ViTs) or leave data.progressive off")
        patch = getattr(body.patch_embed, "patch_size", (1, 1))[0]
        odd = [size for _, size in parse_progressive(cfg.data.progressive) if size % patch]
        if odd and not getattr(body.patch_embed, "dynamic_img_pad", False):
            raise UserError(f"data.progressive: {cfg.model.name} cuts {patch} px patches; size {odd[0]} is not a multiple")
    teacher = None
    if cfg.distill.teacher:  # read and checked before the run directory appears
        from fgclf.distill import load_teacher

        teacher = load_teacher(cfg.distill.teacher, class_names=class_names, student_data=data_cfg,
                               device=accelerator.device)
    parts = build_parts(cfg, [records.labels[i] for i, sp in enumerate(records.splits) if sp == "train"],
                        len(class_names))
    runner = stages = None
    if cfg.parallel == "pipeline":  # this process's stage; every process walks the same batches
        from fgclf.pipeline import PipelineCheckpointer, setup_pipeline

        runner, loaders, stages = setup_pipeline(
            accelerator, model, splits, input_size=data_cfg["input_size"], stages=cfg.pp.stages,
            microbatches=cfg.pp.microbatches, schedule=cfg.pp.schedule, balance=cfg.pp.balance,
            batch_size=t.batch_size, num_workers=cfg.data.num_workers, seed=t.seed, loss_fn=parts.loss_fn,
            resume_dir=resume_dir)
    meta = {"model_name": cfg.model.name, "num_classes": len(class_names), "class_names": class_names,
            "model_kwargs": model_kwargs, "peft": peft_meta, "method": method.metadata(),
            "base": {"model_name": cfg.model.name, "pretrained": cfg.model.pretrained,
                     "weights": str(Path(cfg.model.weights).resolve()) if cfg.model.weights else None},
            "data_config": {k: data_cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "crop_mode",
                                                     "interpolation") if k in data_cfg}}
    checkpointer = (ck.Checkpointer(accelerator, run_dir, meta=meta) if runner is None
                    else PipelineCheckpointer(accelerator, run_dir, meta=meta, runner=runner))
    if resume_dir is not None:
        checkpointer.check_compatible(resume_dir)
    set_run_dir(accelerator, run_dir)
    if accelerator.is_main_process:  # inputs are valid: only now does the run directory appear
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "splits.json", split_summary(records))
        if bad:
            atomic_write_text(run_dir / "bad_images.txt", "".join(f"{p}\t{w}\n" for p, w in bad))
            print(f"skipped {len(bad)} unreadable images (listed in {run_dir / 'bad_images.txt'})")
        save_config(cfg, run_dir / "config.yaml", extra={
            "seed": t.seed, "command": command_line(), "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "versions": package_versions(), "parameters": params, "synthetic": synthetic, "pipeline_stages": stages,
            "split_sizes": {s: len(ds) for s, ds in splits.items()}})
        accelerator.print(f"run directory: {run_dir}\nmodel {cfg.model.name}: {params['trainable']:,} trainable "
                          f"of {params['total']:,} parameters; train/val/test = "
                          f"{len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])} images")
        if stages:
            accelerator.print("pipeline: " + " | ".join(f"stage {s['stage']}: units {s['units'][0]}-{s['units'][1] - 1}, "
                                                        f"{s['parameters']:,} params" for s in stages))
    # ---------------------------------------------------------------- optimizer + schedule
    o = cfg.optim
    optimizer = create_optimizer(model, name=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                 head_lr_scale=o.head_lr_scale, layer_decay=o.layer_decay, fused=o.fused)
    scheduler = create_scheduler(optimizer, name=o.scheduler, epochs=t.epochs, step_on=o.step_on,
                                 updates_per_epoch=-(-len(loaders["train"]) // t.grad_accum_steps),
                                 warmup_epochs=o.warmup_epochs, min_lr_ratio=o.min_lr_ratio,
                                 milestones=o.milestones, gamma=o.gamma, restart_epochs=o.restart_epochs,
                                 restart_mult=o.restart_mult, plateau_patience=o.plateau_patience,
                                 plateau_mode="min" if t.early_stopping_metric == "loss" else "max")
    if runner is None and accelerator.num_processes > 1 and getattr(parts.loss_fn, "class_weights", None) is not None:
        from fgclf.losses import GlobalWeightedMean

        parts.loss_fn = GlobalWeightedMean(parts.loss_fn, accelerator)  # the weighted mean of the global batch
    parts.loss_fn = debug_loss(parts.loss_fn)  # a test hook (no-op unless FGCLF_DEBUG_NAN_AT_STEP is set)
    method.parts = parts
    if type(method).state_dict is not Method.state_dict:  # a method with state of its own: saved in last/ too
        checkpointer.track_states(method=method)
    if runner is None:
        model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, loaders["train"],
                                                                          loaders["test"])
        checkpointer.track_states(scheduler=scheduler)  # stepped by the engine, saved in last/ (JSON, no pickle)
        checkpointer.skip_frozen(model)  # last/ keeps what training changes; frozen weights come from the base
        val_loader = accelerator.prepare(loaders["val"]) if loaders["val"] is not None else None
        hooks = {}
        if t.ema_decay:  # after prepare: the average lives beside the weights it follows (device, dtype)
            from fgclf.ema import ModelEma

            ema = ModelEma(accelerator.unwrap_model(model, keep_torch_compile=False), t.ema_decay, warmup=t.ema_warmup)
            checkpointer.track_states(ema=ema)  # last/ carries the average: resume continues it exactly
        if cfg.model.unfreeze:
            from fgclf.unfreeze import GradualUnfreeze

            unfreeze = GradualUnfreeze(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.model.unfreeze)
            train_mode = unfreeze.train_mode(train_mode)
    else:  # stages are not wrapped by accelerate; the runner replaces the engine's step and eval
        train_loader, val_loader, test_loader = loaders["train"], loaders["val"], loaders["test"]
        checkpointer.track(optimizer, scheduler)
        hooks = {"train_fn": runner.train_one_epoch, "eval_fn": runner.evaluate}
    train_input = eval_input = None
    if plans is not None:  # the GPU input path: each batch is decoded and augmented on the device
        from fgclf.data.device_input import DeviceTransform

        train_input = DeviceTransform(plans["train"], accelerator.device)
        eval_input = DeviceTransform(plans["eval"], accelerator.device)
    accelerator.init_trackers("tensorboard", config={k: v for k, v in _flat(to_dict(cfg)).items()})
    if script_run:  # the modules, the model and the data live until the end: the garbage collector skips them
        import gc

        gc.freeze()
    timeline.mark("setup")
    # ---------------------------------------------------------------- loop
    if runner is None:  # dropout, drop-path and mixup: one stream per process (the pipeline seeds its stages)
        seed_per_process(accelerator, t.seed)
    state = checkpointer.load_last(resume_dir) if resume_dir is not None else TrainState()
    if resume_dir is not None:
        if accelerator.is_main_process and (run_dir / "metrics.jsonl").exists():  # drop lines after the checkpoint
            history = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("epoch", 0) <= state.epoch]
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        accelerator.print(f"resumed from {resume_dir} at epoch {state.epoch}, update {state.global_step}")
    from fgclf.sam import SAM
    from fgclf.tta import num_views

    fit_method = method
    if teacher is not None:  # the teacher's soft targets join the method's loss (fgclf/distill.py)
        from fgclf.distill import Distillation

        fit_method = Distillation(method, teacher, alpha=cfg.distill.alpha, temperature=cfg.distill.temperature)
    try:  # SIGTERM/SIGINT end fit after the current update, with `last` written; debug_* are test hooks (no-ops)
        options = FitOptions(epochs=t.epochs, metric=t.early_stopping_metric, patience=t.early_stopping_patience,
                             min_delta=t.early_stopping_min_delta, clip_grad_norm=t.clip_grad_norm,
                             log_every=t.log_every, checkpoint_every_steps=t.checkpoint_every_steps,
                             max_nonfinite_steps=t.max_nonfinite_steps, progress=t.progress, train_mode=train_mode,
                             callbacks=(_first_update(timeline), *debug_callbacks()), seed=t.seed,
                             ema=ema if t.ema_decay else None,
                             sam=SAM(model.parameters(), rho=t.sam_rho, adaptive=t.sam_adaptive) if t.sam_rho else None,
                             unfreeze=unfreeze if cfg.model.unfreeze else None,
                             train_input=train_input, eval_input=eval_input,
                             epoch_callbacks=method_pictures(accelerator, method, model, splits["test"], run_dir,
                                                             inputs=eval_input))
        state = fit(accelerator, model, train_loader, val_loader, optimizer, scheduler, fit_method, state=state,
                    checkpointer=checkpointer, run_dir=run_dir, num_classes=len(class_names), options=options, **hooks)
    except StopTraining as stop:  # no test evaluation: say how to continue, shut down cleanly, exit 128 + signal
        if accelerator.is_main_process:  # before the shutdown barrier: a launcher may end us once another exits
            again = "--resume last" if cfg.train.output_dir else f"--resume {run_dir}"
            print(f"{stop}; continue with {again}", file=sys.stderr, flush=True)
        model = optimizer = scheduler = train_loader = test_loader = val_loader = None  # released, as at the end
        shutdown(accelerator)
        return stop.exit_code
    timeline.mark("train")
    # ---------------------------------------------------------------- test + save
    checkpointer.load_best_weights(model)
    test_start = time.perf_counter()
    out = hooks.get("eval_fn", evaluate)(accelerator, model, test_loader, method=method, loss_fn=EVAL_LOSS,
                                         progress=t.progress, desc="test",
                                         **({"inputs": eval_input} if eval_input is not None else {}))
    test_seconds = time.perf_counter() - test_start
    timeline.mark("test")
    decoded = None
    if plans is not None:  # what the devices decoded, and what came decoded from the CPU (and why), over processes
        from fgclf.data.device_input import summarize

        decoded = summarize(accelerator, {"train": train_input, "eval": eval_input})
    if accelerator.is_main_process:
        extra = {"loss": out.loss, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
                 "stopped_early": state.stopped_early, "seed": t.seed, "train_seconds": state.train_seconds,
                 "best_weights": state.best_weights, "test_seconds": test_seconds,
                 "tta": "flip" if method.parts.tta_flip else method.parts.tta,
                 "tta_views": num_views("flip" if method.parts.tta_flip else method.parts.tta),
                 "model": cfg.model.name, "method": method.name, "peft": cfg.peft, "strategy": cfg.model.strategy,
                 "parameters": params,
                 "n_train": len(splits["train"]), "n_val": len(splits["val"]),
                 "n_synthetic": synthetic["n_synthetic"] if synthetic else 0}
        if cfg.data.num_folds:
            extra.update(fold=cfg.data.fold, num_folds=cfg.data.num_folds)
        if decoded is not None:
            extra["device_decode"] = decoded
            fallbacks = sum(sum(x["fallbacks"].values()) for x in decoded.values())
            if fallbacks:
                print(f"nvjpeg: {fallbacks} of {sum(x['decoded'] for x in decoded.values())} images were decoded on "
                      f"the CPU: {decoded}")
        metrics = write_evaluation(run_dir, logits=out.logits, labels=out.labels, class_names=class_names,
                                   history=read_jsonl(run_dir / "metrics.jsonl"), split="test", extra=extra,
                                   image_ids=splits["test"].records.image_ids, levels=records.levels)
        print(format_metrics_table(metrics, title=f"test metrics ({run_dir})"))
        for level, m in (metrics.get("levels") or {}).items():
            print(f"level {level} ({m['num_classes']} classes): top1 {m['top1']:.4f}, f1_macro {m['f1_macro']:.4f}")
        from fgclf.report_html import write_html_report

        items = splits["test"].records.items  # image files (an HF dataset's rows have none)
        write_html_report(run_dir, items if all(isinstance(i, str) for i in items) else None)
        timeline.mark("report")
    del model, optimizer, scheduler, train_loader, test_loader, val_loader
    shutdown(accelerator)
    timeline.mark("shutdown")
    if accelerator.is_main_process:
        timeline.write(run_dir / "timings.json")
    return 0


def _first_update(timeline: Timeline):
    """An update callback that marks ``first_update`` once (the rest of the epochs are ``train``)."""
    def mark(state) -> None:
        if not any(name == "first_update" for name, _ in timeline.marks):
            timeline.mark("first_update")
    return mark


def _flat(d: dict, prefix: str = "") -> dict:
    """Flatten nested config for TensorBoard hparams (lists and None become strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
