#!/usr/bin/env python
r"""Train a generative model of the training images: class-conditional DCGAN, DCGAN or diffusion.

    accelerate launch scripts/train_gan.py                                  # cdcgan on the toy set, 32 px
    accelerate launch scripts/train_gan.py --gan.arch diffusion --gan.image_size 32
    accelerate launch scripts/train_gan.py --gan.arch dcgan --gan.image_size 256 \
        --gan.latent_dim 100 --train.batch_size 128 --train.epochs 10    # the lab notes' DCGAN config
    accelerate launch scripts/train_gan.py ... --resume last               # continue an interrupted run

Only the *train* split is used (the same seeded split as train_classifier.py with the same
--data settings), so generated images never carry information from validation or test images.
Writes a run directory: config.yaml (settings, seed, command, versions), metrics.jsonl (losses
per epoch), samples/epoch_NNN.png (fixed noise, one row per class), TensorBoard logs,
checkpoints/last/ (everything --resume needs) and checkpoints/generator/ (generator and
discriminator safetensors + config.json, what scripts/generate.py loads; the EMA generator
when gan.ema_decay > 0).

Runs on CPU, one GPU or DDP, with fp16/bf16 from the accelerate config. DeepSpeed and FSDP
are refused: two models with two optimizers stepped in turn need more than their single-engine
set-up, and a silently wrong run is worse than a clear error.
Flags: ``--help`` lists all; precedence is defaults < ``--config`` YAML < CLI flags.
"""
from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import TrainGanConfig, parse_config, save_config, to_dict  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import (broadcast_from_main, check_resume_config, command_line, create_accelerator,  # noqa: E402
                           default_run_name, prepare_run_dir, resolve_resume, script_main, set_run_dir, shutdown)


def validate(cfg: TrainGanConfig) -> None:
    """Reject impossible values and unknown names before anything heavy starts."""
    g, t = cfg.gan, cfg.train
    checks = [(t.epochs >= 1, "train.epochs must be >= 1"),
              (t.batch_size >= 1, "train.batch_size must be >= 1"),
              (g.latent_dim >= 1, "gan.latent_dim must be >= 1"),
              (g.base_width >= 8, "gan.base_width must be >= 8"),
              (g.lr_g > 0 and g.lr_d > 0, "gan.lr_g and gan.lr_d must be > 0"),
              (0 <= g.ema_decay < 1, "gan.ema_decay must be in [0, 1)"),
              (g.d_steps >= 1, "gan.d_steps must be >= 1"),
              (g.diffusion_steps >= 2 and g.sample_steps >= 1, "gan.diffusion_steps >= 2 and gan.sample_steps >= 1"),
              (g.sample_steps <= g.diffusion_steps, "gan.sample_steps must be <= gan.diffusion_steps"),
              (t.sample_every >= 1 and t.grid_per_class >= 1 and t.grid_classes >= 1,
               "train.sample_every, train.grid_per_class and train.grid_classes must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if g.arch == "diffusion":
        from fgclf.gan.diffusion import _require_diffusers

        _require_diffusers()
        if g.image_size % 4:
            raise UserError(f"diffusion image_size must be a multiple of 4, got {g.image_size}")
        if g.base_width % 8:
            raise UserError(f"diffusion base_width must be a multiple of 8 (GroupNorm groups), got {g.base_width}")
    else:
        from fgclf.gan import GAN_LOSSES, check_image_size
        from fgclf.registry import unknown_name_message

        check_image_size(g.image_size)
        if g.loss not in GAN_LOSSES:
            raise UserError(unknown_name_message("GAN loss", g.loss, GAN_LOSSES.names()))


def gan_transform(image_size: int, hflip: bool):
    """Resize the short side, center crop, optional mirror, to [-1, 1] (the generators' tanh range)."""
    from torchvision import transforms as T

    steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(image_size)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


def debug_kill_at(step: int) -> None:
    """Test hook: ``FGCLF_DEBUG_KILL_AT_STEP=N`` SIGKILLs this process right after update N."""
    target = os.environ.get("FGCLF_DEBUG_KILL_AT_STEP")
    if target and step == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


@script_main
def main(argv: list[str] | None = None) -> int:
    # ---------------------------------------------------------------- config
    cfg = parse_config(TrainGanConfig, argv, prog="train_gan.py", description=__doc__)
    validate(cfg)
    output_dir, resume_dir = resolve_resume(cfg.resume, cfg.train.output_dir)
    # ---------------------------------------------------------------- accelerator
    import json

    import torch
    from accelerate.utils import DistributedType, set_seed
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    from fgclf import data as fd
    from fgclf.data import split_summary
    from fgclf.gan import (GANObjective, build_models, gan_spec, generate_images, grid_labels, is_conditional,
                           sample_noise, save_generator, save_grid)
    from fgclf.report import append_jsonl, read_jsonl
    from fgclf.checkpoint import OBJECTS_DIR, load_object_states, save_object_states
    from fgclf.utils import atomic_write_json, atomic_write_text, package_versions, peak_memory_mb, replace_dir

    t, g = cfg.train, cfg.gan
    accelerator = create_accelerator(mixed_precision=t.mixed_precision)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(f"train_gan.py does not support {accelerator.distributed_type.value}: a GAN steps two "
                        "models with two optimizers in turn; use a DDP accelerate config (the models are small)")
    if t.batch_size % accelerator.num_processes:
        raise UserError(f"train.batch_size {t.batch_size} must be divisible by the {accelerator.num_processes} processes")
    name = default_run_name(cfg.data.format, g.arch, f"{g.image_size}px")
    run_dir = Path(broadcast_from_main(accelerator, lambda: str(prepare_run_dir(
        output_dir, t.name, default_name=name, resuming=resume_dir is not None))))
    if resume_dir is not None:
        t.seed = broadcast_from_main(accelerator, lambda: check_resume_config(cfg, run_dir))
    elif t.seed == "random":
        t.seed = broadcast_from_main(accelerator, lambda: secrets.randbelow(2**31 - 1))
        accelerator.print(f"random seed: {t.seed}")
    set_seed(t.seed)
    # ---------------------------------------------------------------- data + models
    records, bad = broadcast_from_main(accelerator, lambda: fd.load_records_from_config(cfg.data))
    class_names = records.class_names
    train_set = fd.create_dataset(records=records, split="train", transform=gan_transform(g.image_size, t.hflip),
                                  decoder=cfg.data.decoder)
    if len(train_set) < t.batch_size:
        raise UserError(f"the train split has {len(train_set)} images, fewer than train.batch_size {t.batch_size}")
    spec = gan_spec(g, len(class_names))
    generator, discriminator = build_models(spec)
    conditional = is_conditional(spec)
    data_meta = {k: getattr(cfg.data, k) for k in ("format", "root", "val_fraction", "test_fraction", "split_seed",
                                                   "num_folds", "fold", "bbox_crop")}
    data_meta["root"] = str(Path(data_meta["root"]).resolve()) if data_meta["root"] else None
    export_meta = {"data": data_meta, "n_train": len(train_set), "seed": t.seed,
                   "train_image_ids": list(train_set.records.image_ids)}
    set_run_dir(accelerator, run_dir)
    params = {"generator": sum(p.numel() for p in generator.parameters()),
              "discriminator": sum(p.numel() for p in discriminator.parameters()) if discriminator else 0}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "splits.json", split_summary(records))
        if bad:
            atomic_write_text(run_dir / "bad_images.txt", "".join(f"{p}\t{w}\n" for p, w in bad))
        save_config(cfg, run_dir / "config.yaml", extra={
            "seed": t.seed, "command": command_line(), "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "versions": package_versions(), "parameters": params, "spec": spec, "n_train": len(train_set)})
        accelerator.print(f"run directory: {run_dir}\n{g.arch} {g.image_size}px: generator {params['generator']:,} / "
                          f"discriminator {params['discriminator']:,} parameters; {len(train_set)} train images, "
                          f"{len(class_names)} classes")
    # ---------------------------------------------------------------- optimizers, prepare
    betas = (g.beta1, g.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=g.lr_g, betas=betas)
    loader = torch.utils.data.DataLoader(train_set, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    if discriminator is not None:
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=g.lr_d, betas=betas)
        generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(generator, discriminator, opt_g, opt_d,
                                                                             loader)
    else:
        generator, opt_g, loader = accelerator.prepare(generator, opt_g, loader)
    raw_g = accelerator.unwrap_model(generator)
    ema = None
    if g.ema_decay > 0:  # warmup: decay 1 - (1 + step)^(-2/3) until it reaches ema_decay (short runs too)
        ema = ModelEmaV3(raw_g, decay=g.ema_decay, use_warmup=True)
    objective = GANObjective(g.loss, aux_weight=g.aux_weight) if discriminator is not None else None
    accelerator.init_trackers("tensorboard", config={"arch": g.arch, "image_size": g.image_size, "seed": t.seed})

    def sampler_model() -> torch.nn.Module:
        return raw_g if ema is None else ema.module  # EMA of weights and BatchNorm statistics

    def export(state: dict) -> None:
        if accelerator.is_main_process:
            save_generator(run_dir / "checkpoints" / "generator", sampler_model(),
                           accelerator.unwrap_model(discriminator) if discriminator is not None else None,
                           spec=spec, class_names=class_names,
                           extra={**export_meta, "epoch": state["epoch"], "ema": ema is not None,
                                  "ema_decay": g.ema_decay})
        accelerator.wait_for_everyone()

    def save_last(state: dict) -> None:
        tmp = run_dir / "checkpoints" / ".last.tmp"
        if accelerator.is_main_process:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / "trainer_state.json", state)
            atomic_write_json(tmp / "config.json", {"spec": spec, "class_names": class_names})
            save_object_states(tmp / OBJECTS_DIR, {"ema": ema} if ema is not None else {})  # safetensors, no pickle
            replace_dir(tmp, run_dir / "checkpoints" / "last")
        accelerator.wait_for_everyone()

    state = {"epoch": 0, "global_step": 0, "train_seconds": 0.0}
    if resume_dir is not None:
        if not (Path(resume_dir) / "trainer_state.json").is_file():
            raise UserError(f"no resumable checkpoint at {resume_dir} (the run stopped before its first epoch "
                            "ended): start it again without --resume, in a new --train.output_dir")
        saved = json.loads((Path(resume_dir) / "config.json").read_text())
        if saved.get("spec") != spec:
            raise UserError(f"cannot resume from {resume_dir}: it holds a {saved.get('spec')} model, this run "
                            f"builds {spec}")
        accelerator.load_state(str(Path(resume_dir) / "state"))
        load_object_states(Path(resume_dir) / OBJECTS_DIR, {"ema": ema} if ema is not None else {},
                           legacy_dir=Path(resume_dir) / "state")
        state = json.loads((Path(resume_dir) / "trainer_state.json").read_text())
        if accelerator.is_main_process and (run_dir / "metrics.jsonl").exists():
            history = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("epoch", 0) <= state["epoch"]]
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        accelerator.print(f"resumed from {resume_dir} at epoch {state['epoch']}")
    grid_y = grid_labels(spec["num_classes"], t.grid_per_class, t.grid_classes)
    grid_n = len(grid_y) if grid_y is not None else t.grid_per_class * t.grid_per_class
    grid_z = sample_noise(spec, grid_n, seed=t.seed)  # fixed across epochs: progress is visible
    # ---------------------------------------------------------------- loop
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index

    def global_randn(n: int, *shape: int) -> torch.Tensor:
        """This process's slice of noise drawn for the whole global batch: every process draws
        the same numbers (same seed), so N processes see N different slices, as one process would."""
        return torch.randn(n * world, *shape, device=device)[rank * n:(rank + 1) * n]

    while state["epoch"] < t.epochs:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state["epoch"])
        generator.train()
        if discriminator is not None:
            discriminator.train()
        sums: dict[str, torch.Tensor] = {}
        batches, epoch_start = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}", leave=False,
                   disable=not (t.progress and accelerator.is_local_main_process))
        for images, labels in bar:
            n = images.shape[0]
            logs: dict[str, torch.Tensor] = {}
            if discriminator is None:  # diffusion: one regression loss
                t_all = torch.randint(0, spec["diffusion_steps"], (n * world,), device=device)
                loss = generator(images, labels, noise=global_randn(n, *images.shape[1:]),
                                 timesteps=t_all[rank * n:(rank + 1) * n])
                opt_g.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt_g.step()
                logs["loss"] = loss.detach()
            else:
                y = labels if conditional else None
                for _ in range(g.d_steps):  # D on real and fake in one pass (spectral norm, no batch norm)
                    with torch.no_grad():
                        fake = generator(global_randn(n, spec["latent_dim"]), y)
                    scores, aux = discriminator(torch.cat([images, fake.to(images.dtype)]),
                                                torch.cat([labels, labels]) if conditional else None)
                    out_d = objective.discriminator(scores[:n], scores[n:], labels=labels,
                                                    aux_real=aux[:n] if aux is not None else None)
                    opt_d.zero_grad(set_to_none=True)
                    accelerator.backward(out_d["loss"])
                    opt_d.step()
                fake = generator(global_randn(n, spec["latent_dim"]), y)
                scores, aux = discriminator(fake, y)
                out_g = objective.generator(scores, aux_fake=aux, labels=labels)
                opt_g.zero_grad(set_to_none=True)
                accelerator.backward(out_g["loss"])
                opt_g.step()
                logs = {"d_loss": out_d["loss"].detach(), "g_loss": out_g["loss"].detach(),
                        **{k: v.detach() for k, v in {**out_d, **out_g}.items() if k != "loss"}}
            if ema is not None:
                ema.update(raw_g, step=state["global_step"])
            for k, v in logs.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            batches += 1
            state["global_step"] += 1
            if t.log_every and state["global_step"] % t.log_every == 0:
                running = {k: (v / batches).item() for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items() if k in ("d_loss", "g_loss", "loss")})
                accelerator.log({f"train/{k}": v for k, v in running.items()}, step=state["global_step"])
            debug_kill_at(state["global_step"])
        bar.close()
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "step": state["global_step"]}
        record.update({k: accelerator.reduce(v / max(batches, 1), "mean").item() for k, v in sorted(sums.items())})
        record.update(epoch_time=time.perf_counter() - epoch_start, memory_mb=peak_memory_mb(device))
        if not all(v == v and abs(v) != float("inf") for v in record.values() if isinstance(v, float)):
            raise UserError(f"non-finite loss at epoch {state['epoch']} ({record}); lower the learning rates or "
                            "use another gan.loss. The last good checkpoint is kept")
        if accelerator.is_main_process:
            append_jsonl(run_dir / "metrics.jsonl", record)
            if state["epoch"] % t.sample_every == 0 or state["epoch"] == t.epochs:
                images = generate_images(sampler_model(), spec, grid_z, grid_y)
                save_grid(images, run_dir / "samples" / f"epoch_{state['epoch']:03d}.png",
                          per_row=t.grid_per_class)
            accelerator.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in record.items() if k not in ("memory_mb",)))
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state["global_step"])
        state["train_seconds"] = state.get("train_seconds", 0.0) + time.perf_counter() - epoch_start
        export(state)
        save_last(state)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "train_summary.json", {
            "epochs": state["epoch"], "steps": state["global_step"], "train_seconds": state["train_seconds"],
            "seed": t.seed, "spec": spec, "parameters": params, "generator": str(run_dir / "checkpoints" / "generator"),
            "config": to_dict(cfg)})
        accelerator.print(f"generator: {run_dir / 'checkpoints' / 'generator'} (scripts/generate.py --generator "
                          f"{run_dir})")
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
