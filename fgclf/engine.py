"""Accelerator-driven training and evaluation loops (plain functions, one loop for every backend).

``train_one_epoch`` and ``evaluate`` use only ``accelerator.accumulate / backward /
clip_grad_norm_ / gather_for_metrics / reduce``, so the same code runs on one CPU, DDP,
DeepSpeed and FSDP. ``fit`` adds per-epoch validation, early stopping, checkpoints and logs.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fgclf.data.mixup import tta_flip_logits
from fgclf.metrics import compute_metrics
from fgclf.report import append_jsonl
from fgclf.utils import peak_memory_mb

# validation/test loss is plain cross-entropy whatever the training criterion (label smoothing,
# focal, class weights), so runs with different losses report comparable numbers
EVAL_LOSS = nn.CrossEntropyLoss()


@dataclass
class TrainState:
    """Counters that a checkpoint must restore for ``--resume`` to continue exactly.

    Attributes:
        epoch: Completed epochs.
        global_step: Optimizer updates done.
        step_in_epoch: Batches done in the current, unfinished epoch (step checkpoints).
        best_metric: Best validation value of the watched metric so far.
        best_epoch: Epoch (1-based) of that value.
        bad_epochs: Epochs since the last improvement (early stopping).
        stopped_early: Whether early stopping ended the run.
        train_seconds: Wall time of the finished epochs (training + validation + checkpoints),
            summed over resumed pieces of the run.
    """

    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalOutput:
    """Gathered evaluation outputs: every sample exactly once, in dataset order."""

    logits: np.ndarray
    labels: np.ndarray
    loss: float


def input_dtype(accelerator) -> Optional[torch.dtype]:
    """The dtype model inputs need: DeepSpeed fp16/bf16 casts the weights but not the inputs
    (accelerate's autocast does not apply there); None elsewhere."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


def train_one_epoch(accelerator, model: nn.Module, loader, optimizer, scheduler, loss_fn: nn.Module, *,
                    state: TrainState, clip_grad_norm: Optional[float] = None, log_every: int = 10,
                    progress: bool = True, train_mode: Optional[Callable[[nn.Module], None]] = None,
                    on_update: Optional[Callable[[TrainState], None]] = None,
                    regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None,
                    mixup: Optional[Callable] = None) -> dict:
    """One pass over ``loader`` (already prepared, possibly skipping finished batches).

    Returns:
        ``{"train_loss", "lr", "samples", "epoch_time"}``: the loss (including any
        ``regularizer`` penalty) averaged over all processes and batches of this epoch, and the
        number of training samples seen by all processes together.
    """
    (train_mode or (lambda m: m.train()))(model)
    cast = input_dtype(accelerator)
    start, loss_sum, batches, samples = time.perf_counter(), None, 0, 0
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}", leave=False,
               disable=not (progress and accelerator.is_local_main_process))
    for images, labels in bar:
        if mixup is not None:  # soft targets from then on; every loss accepts them
            images, labels = mixup(images, labels)
        with accelerator.accumulate(model):
            logits = model(images if cast is None else images.to(cast))
            loss = loss_fn(logits.float(), labels)
            if regularizer is not None:  # explicit L1/Lp penalty (not the optimizer's weight decay)
                loss = loss + regularizer(model)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step_update()  # once per real update: accumulation/fp16 skips don't count
            optimizer.zero_grad(set_to_none=True)
        detached = loss.detach().float()
        loss_sum = detached if loss_sum is None else loss_sum + detached
        batches += 1
        samples += images.shape[0]
        state.step_in_epoch += 1
        if accelerator.sync_gradients:
            state.global_step += 1
            if log_every and state.global_step % log_every == 0:
                running = loss_sum.item() / batches  # the only host sync, at log intervals
                bar.set_postfix(loss=f"{running:.4f}")
                accelerator.log({"train/loss_running": running,
                                 "train/lr": optimizer.param_groups[0]["lr"]}, step=state.global_step)
            if on_update is not None:
                on_update(state)
    bar.close()
    mean_loss = accelerator.reduce(loss_sum / max(batches, 1), "mean").item() if batches else float("nan")
    samples = int(accelerator.reduce(torch.tensor(samples, device=accelerator.device), "sum").item())
    return {"train_loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "samples": samples,
            "epoch_time": time.perf_counter() - start}


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, *, loss_fn: Optional[nn.Module] = None,
             progress: bool = False, desc: str = "eval", tta_flip: bool = False) -> EvalOutput:
    """Logits and labels of every sample in ``loader``, gathered from all processes.

    ``gather_for_metrics`` drops the samples that distributed samplers duplicate to even out
    the last batch, so each sample counts exactly once; order is the dataset's order.
    """
    model.eval()
    cast = input_dtype(accelerator)
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False,
                               disable=not (progress and accelerator.is_local_main_process)):
        if cast is not None:
            images = images.to(cast)
        logits = (tta_flip_logits(model, images) if tta_flip else model(images)).float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits)  # stays on the device: one copy to the host at the end, not one per batch
        all_labels.append(labels)
    logits = torch.cat(all_logits).cpu() if all_logits else torch.empty(0)
    labels = torch.cat(all_labels).cpu() if all_labels else torch.empty(0, dtype=torch.long)
    loss = float(loss_fn(logits, labels)) if (loss_fn is not None and len(labels)) else float("nan")
    return EvalOutput(logits.numpy(), labels.numpy(), loss)


def _improved(value: float, best: Optional[float], min_delta: float, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


def fit(accelerator, model: nn.Module, train_loader, val_loader, optimizer, scheduler, loss_fn: nn.Module, *,
        epochs: int, state: TrainState, checkpointer, run_dir: str | Path, num_classes: int,
        metric: str = "top1", patience: int = 0, min_delta: float = 0.0,
        clip_grad_norm: Optional[float] = None, log_every: int = 10, checkpoint_every_steps: int = 0,
        progress: bool = True, train_mode: Optional[Callable[[nn.Module], None]] = None,
        regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None, mixup: Optional[Callable] = None,
        tta_flip: bool = False, callbacks: tuple[Callable[[TrainState], None], ...] = (),
        train_fn: Optional[Callable[..., dict]] = None, eval_fn: Optional[Callable[..., EvalOutput]] = None) -> TrainState:
    """Train for ``epochs`` from ``state``, validating and checkpointing after every epoch.

    The watched ``metric`` (``loss`` is minimised, anything else maximised) selects the
    ``best`` checkpoint and drives early stopping after ``patience`` epochs without a
    ``min_delta`` improvement. ``last`` is written at every epoch end (and every
    ``checkpoint_every_steps`` updates) so that ``--resume`` continues from it.
    ``train_fn``/``eval_fn`` replace :func:`train_one_epoch`/:func:`evaluate` (same signatures),
    e.g. with a pipeline-parallel runner's.
    """
    train_fn, eval_fn = train_fn or train_one_epoch, eval_fn or evaluate
    mode = "min" if metric == "loss" else "max"
    history_path = Path(run_dir) / "metrics.jsonl"

    def on_update(st: TrainState) -> None:
        if checkpoint_every_steps and st.global_step % checkpoint_every_steps == 0:
            checkpointer.save_last(st)
        for callback in callbacks:
            callback(st)

    while state.epoch < epochs and not state.stopped_early:
        epoch_start = time.perf_counter()
        loader = train_loader
        if state.step_in_epoch:  # resumed from a mid-epoch checkpoint
            loader = (train_loader.skip(state.step_in_epoch) if hasattr(train_loader, "skip")
                      else accelerator.skip_first_batches(train_loader, state.step_in_epoch))
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)  # same shuffle for epoch e whether resumed or not
        record = train_fn(accelerator, model, loader, optimizer, scheduler, loss_fn, state=state,
                                 clip_grad_norm=clip_grad_norm, log_every=log_every, progress=progress,
                                 train_mode=train_mode, on_update=on_update, regularizer=regularizer,
                                 mixup=mixup)
        state.epoch += 1
        state.step_in_epoch = 0
        record = {"epoch": state.epoch, "step": state.global_step, **record}
        if val_loader is not None:
            out = eval_fn(accelerator, model, val_loader, loss_fn=EVAL_LOSS, progress=progress, desc="val",
                           tta_flip=tta_flip)
            scores = compute_metrics(out.logits, out.labels, num_classes=num_classes)
            record.update({"val/loss": out.loss, "val/num_samples": int(len(out.labels)),
                           **{f"val/{k}": v for k, v in scores.items()}})
            value = out.loss if metric == "loss" else scores.get(metric)
            if value is None:
                from fgclf.errors import UserError

                raise UserError(f"early_stopping_metric '{metric}' is not computed; use loss or one of "
                                f"{', '.join(scores)}")
            if _improved(value, state.best_metric, min_delta, mode):
                state.best_metric, state.best_epoch, state.bad_epochs = float(value), state.epoch, 0
                checkpointer.save_best(model, state)
            else:
                state.bad_epochs += 1
                if patience and state.bad_epochs >= patience:
                    state.stopped_early = True
        else:
            state.best_epoch = state.epoch
            checkpointer.save_best(model, state)
        watched = record.get("val/loss" if metric == "loss" else f"val/{metric}")
        scheduler.step_epoch(watched)
        record["memory_mb"] = peak_memory_mb(accelerator.device)
        if accelerator.is_main_process:
            append_jsonl(history_path, record)
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.global_step)
        state.train_seconds += time.perf_counter() - epoch_start  # saved with the state: resumes add up
        checkpointer.save_last(state)
        if accelerator.is_main_process:
            msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                           if k in ("epoch", "train_loss", "val/loss", "val/top1", "val/f1_macro", "lr"))
            accelerator.print(msg + (" (early stop)" if state.stopped_early else ""))
    return state
