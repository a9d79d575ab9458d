"""Accelerator-driven training and evaluation loops (plain functions, one loop for every backend).

``train_one_epoch`` and ``evaluate`` use only ``accelerator.accumulate / backward /
clip_grad_norm_ / gather_for_metrics / reduce``, so the same code runs on one CPU, DDP,
DeepSpeed and FSDP. ``fit`` adds per-epoch validation, early stopping, checkpoints and logs,
and ends a run early, with ``last`` intact, on SIGTERM/SIGINT or persistent non-finite losses
(:class:`RunGuard`).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fgclf.errors import UserError
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
        step_in_epoch: Batches done in the current, unfinished epoch (step checkpoints, stop signals).
        best_metric: Best validation value of the watched metric so far.
        best_epoch: Epoch (1-based) of that value.
        bad_epochs: Epochs since the last improvement (early stopping).
        stopped_early: Whether early stopping ended the run.
        train_seconds: Wall time of the finished epochs (training + validation + checkpoints),
            summed over resumed pieces of the run.
        best_weights: Which weights ``best`` holds: ``raw`` (the trained ones) or ``ema`` (their
            moving average, ``--train.ema_decay``).
    """

    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    best_weights: str = "raw"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalOutput:
    """Gathered evaluation outputs: every sample exactly once, in dataset order."""

    logits: np.ndarray
    labels: np.ndarray
    loss: float


# SIGUSR2: what SLURM sends before a job's time limit when asked (submitit's --signal=USR2@90)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ())


class StopTraining(Exception):
    """A stop signal ended training after ``last`` was written; exit with :attr:`exit_code`."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class NonFiniteLoss(UserError):
    """The training loss stayed nan/inf for more consecutive updates than allowed."""


class RunGuard:
    """What ends a run early, watched without a host sync at every step: stop signals
    (SIGTERM/SIGINT, see :meth:`catch_signals`) and non-finite training losses.

    The engine hands each training loss to :meth:`observe` and marks each optimizer update with
    :meth:`end_update`; both only queue device work. :meth:`poll` reads the per-update flags (one
    host sync) and, on several processes, all-reduces them with the stop signals (MAX), so every
    process sees the same losses and stops at the same update, whichever process got the signal.
    ``fit`` polls every ``check_every`` updates (default: every update on CPU, where reading a
    tensor costs nothing; every 10 on accelerators), before each ``last`` write and at epoch ends.

    A non-finite loss is not skipped here: under fp16 loss scaling its step is skipped by the
    scaler as usual, but deciding a skip in fp32/bf16 would need a host sync every step. Its step
    is then applied (the weights usually become nan too, so the losses stay non-finite), which is
    why ``last`` is not written after an update with a non-finite loss unless the scaler skipped it.

    Args:
        accelerator: The run's ``Accelerator``.
        max_nonfinite_steps: Consecutive updates with a non-finite loss that are tolerated; one
            more stops the run (0: stop at the first). Without a loss scaler the run also stops
            at an epoch end that follows a non-finite loss (the weights are then not usable).
        check_every: Poll interval in updates (None: 1 on CPU, 10 elsewhere).
    """

    def __init__(self, accelerator, *, max_nonfinite_steps: int = 3, check_every: Optional[int] = None) -> None:
        self.accelerator = accelerator
        self.max_nonfinite_steps = max_nonfinite_steps
        self.check_every = check_every or (1 if accelerator.device.type == "cpu" else 10)
        self.multi = accelerator.num_processes > 1
        self.skips_bad_steps = getattr(accelerator, "scaler", None) is not None  # fp16 loss scaling
        self.signum = 0  # first stop signal this process received
        self.agreed_signum = 0  # the stop signal all processes agreed on at the last poll
        self.run, self.run_start = 0, 0  # consecutive updates with a non-finite loss so far, first of them
        self._bad: Optional[torch.Tensor] = None  # device flag: non-finite loss in the current update
        self._flags: list = []  # one device flag per update since the last poll
        self._step = 0

    def observe(self, loss: torch.Tensor) -> None:
        """Note one micro-batch loss (device ops only)."""
        bad = torch.isfinite(loss.detach()).all().logical_not()
        self._bad = bad if self._bad is None else self._bad | bad

    def end_update(self, step: int) -> None:
        """Close update ``step``: its losses become one flag (no host sync)."""
        self._flags.append(self._bad if self._bad is not None else False)
        self._bad, self._step = None, step

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def poll(self) -> Optional[tuple[int, int]]:
        """Read the flags (and agree on them and on stop signals across processes).

        Returns:
            ``(first, last)`` update of a run of non-finite losses longer than allowed, or None.
        """
        device = self.accelerator.device
        flags = [f.to(device=device, dtype=torch.int64) if torch.is_tensor(f)
                 else torch.zeros((), dtype=torch.int64, device=device) for f in self._flags]
        values = torch.stack([torch.tensor(self.signum, dtype=torch.int64, device=device), *flags])
        if self.multi:
            import torch.distributed as dist

            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        signum, *bad = values.tolist()
        self.agreed_signum = self.agreed_signum or signum
        first_update, exceeded = self._step - len(bad) + 1, None
        for i, is_bad in enumerate(bad):
            if not is_bad:
                self.run = 0
                continue
            self.run += 1
            if self.run == 1:
                self.run_start = first_update + i
            if self.run > self.max_nonfinite_steps and exceeded is None:
                exceeded = (self.run_start, first_update + i)
        self._flags = []
        return exceeded

    @property
    def can_save(self) -> bool:
        """Whether the weights may go into ``last``: the latest update's loss was finite, or its
        step was skipped by the loss scaler."""
        return self.run == 0 or self.skips_bad_steps

    def stopping(self) -> int:
        """The stop signal to act on now (0: none): this process's own on one process (no
        collective needed), else the one agreed at the last :meth:`poll`."""
        return self.agreed_signum if self.multi else self.signum

    @contextlib.contextmanager
    def catch_signals(self, signals: tuple[int, ...] = STOP_SIGNALS):
        """While open, SIGTERM/SIGINT (and SIGUSR2: SLURM's warning before a time limit, as submitit
        asks for it) only set :attr:`signum` (``fit`` then finishes the update,
        writes ``last`` and raises :class:`StopTraining`); a second SIGINT (Ctrl-C twice) aborts
        at once with KeyboardInterrupt. Outside the main thread nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame) -> None:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not self.signum:
                self.signum = signum
                if self.accelerator.is_main_process:
                    print(f"{signal.Signals(signum).name}: finishing this update, then writing a checkpoint and "
                          "stopping" + (" (Ctrl-C again aborts)" if signum == signal.SIGINT else ""),
                          file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in signals}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, signal.SIG_DFL if h is None else h)


def input_dtype(accelerator) -> Optional[torch.dtype]:
    """The dtype model inputs need: DeepSpeed fp16/bf16 casts the weights but not the inputs
    (accelerate's autocast does not apply there); None elsewhere."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


@dataclass
class FitOptions:
    """How ``fit`` runs, apart from the model, data, optimizer and method.

    Attributes:
        epochs: Train until this many epochs are complete.
        metric: Validation metric that picks ``best`` and drives early stopping (``loss`` is
            minimised, anything else maximised).
        patience: Epochs without a ``min_delta`` improvement before stopping (0: never).
        min_delta: Smallest change that counts as an improvement.
        clip_grad_norm: Clip the gradient norm to this value (None: no clipping).
        log_every: Log the running loss every this many updates.
        checkpoint_every_steps: Also write ``last`` every this many updates (0: epoch ends only).
        progress: tqdm bars on the main process.
        train_mode: Puts the model in training mode (a transfer strategy keeps frozen parts in eval).
        callbacks: Run after every optimizer update with the :class:`TrainState`.
        epoch_callbacks: Run on every process after each epoch's validation (e.g. attention pictures).
        max_nonfinite_steps: Consecutive non-finite losses tolerated (:class:`RunGuard`).
        seed: The run's seed (per-sample random choices of a method, see ``StepContext.uniform``).
        ema: A :class:`fgclf.ema.ModelEma` of the model: updated after every optimizer update,
            validated beside the raw weights, and saved as ``best`` when it scores higher.
        sam: A :class:`fgclf.sam.SAM` of the model's trainable parameters: every update takes
            the gradient again at the perturbed weights (see :func:`_sam_second_pass`).
        unfreeze: A :class:`fgclf.unfreeze.GradualUnfreeze`: told the epoch before ``train_mode``
            runs, and the frozen parameters' gradients dropped before clipping and each step.
        train_input, eval_input: Make each batch's images on the device from what the loader
            gave (:class:`fgclf.data.device_input.DeviceTransform`: the GPU decode path); None:
            the loader's images are the input.
    """

    epochs: int = 1
    metric: str = "top1"
    patience: int = 0
    min_delta: float = 0.0
    clip_grad_norm: Optional[float] = None
    log_every: int = 10
    checkpoint_every_steps: int = 0
    progress: bool = True
    train_mode: Optional[Callable[[nn.Module], None]] = None
    callbacks: tuple = ()
    epoch_callbacks: tuple = ()
    max_nonfinite_steps: int = 3
    seed: int = 0
    ema: Optional[Any] = None
    sam: Optional[Any] = None
    unfreeze: Optional[Any] = None
    train_input: Optional[Callable] = None
    eval_input: Optional[Callable] = None


def _plain(method):
    """``method``, or ``plain`` around a bare loss function (``fit(..., nn.CrossEntropyLoss(), ...)``)."""
    from fgclf.methods import Method, StepParts, create_method

    return method if isinstance(method, Method) else create_method("plain", parts=StepParts(loss_fn=method))


def _sam_second_pass(accelerator, model: nn.Module, method, ctx, sam, micro: list) -> None:
    """SAM's second gradient (fgclf/sam.py): at the perturbed weights, over the update's micro-batches
    ``micro`` (``(batch, rng state and ctx position before its first pass)``), with their random draws
    (global streams and the context's keyed draws) replayed and
    BatchNorm's running statistics left alone; the gradient replaces the first (all-reduced again
    on the last micro-batch), and the weights go back."""
    from contextlib import nullcontext

    from fgclf.sam import frozen_running_stats, rng_state, set_rng_state

    if not sam.perturb():
        return
    after, position = rng_state(), _ctx_position(ctx)  # where the first pass left them: the run goes on from there
    for p in sam.params:
        p.grad = None
    ctx.replay = True
    try:
        with frozen_running_stats(model):
            for k, (batch, state, at) in enumerate(micro):
                set_rng_state(state)
                _set_ctx_position(ctx, at)
                last = k == len(micro) - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    accelerator.backward(method.training_step(model, batch, ctx).loss)
    finally:
        ctx.replay = False
    set_rng_state(after)
    _set_ctx_position(ctx, position)
    sam.restore()


def _ctx_position(ctx) -> tuple:
    return ctx.batch_index, ctx.global_step, ctx.substep, ctx.draws


def _set_ctx_position(ctx, at: tuple) -> None:
    ctx.batch_index, ctx.global_step, ctx.substep, ctx.draws = at


def train_one_epoch(accelerator, model: nn.Module, loader, optimizer, scheduler, method, *,
                    state: TrainState, options: Optional[FitOptions] = None,
                    on_update: Optional[Callable[[TrainState], None]] = None,
                    guard: Optional[RunGuard] = None) -> dict:
    """One pass over ``loader`` (already prepared, possibly skipping finished batches).

    ``method`` (a :class:`fgclf.methods.Method`, or a bare loss for ``plain``) computes each step's
    loss; this loop owns ``accumulate / backward / clip / step``. ``guard`` (from ``fit``) is shown
    every loss and update, with device ops only; ``on_update`` runs after every optimizer update
    (``fit`` checkpoints and polls the guard there).

    Returns:
        ``{"train_loss", "lr", "samples", "epoch_time"}`` plus ``train/<term>`` for the method's
        loss terms: the loss (every term included) averaged over all processes and batches of this
        epoch, and the number of training samples seen by all processes together.
    """
    from fgclf.methods import StepContext

    method, o = _plain(method), options or FitOptions()
    if o.unfreeze is not None:
        o.unfreeze.set_epoch(state.epoch)
    (o.train_mode or (lambda m: m.train()))(model)
    ctx = StepContext(accelerator=accelerator, cast=input_dtype(accelerator), seed=o.seed, epoch=state.epoch)
    start, loss_sum, batches, samples, term_sums = time.perf_counter(), None, 0, 0, {}
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}", leave=False,
               disable=not (o.progress and accelerator.is_local_main_process))
    micro: list = []  # SAM: this update's micro-batches and the RNG state before each
    if o.sam is not None:
        from fgclf.sam import rng_state
    for batch in bar:
        if o.train_input is not None:  # the GPU input path: decoded and augmented here, on the device
            batch = (o.train_input(batch[0]), *batch[1:])
        ctx.start_batch(state.step_in_epoch, state.global_step)
        stepped = False  # did any of this batch's optimizer steps apply (fp16 loss scaling may skip one)?
        for substep in range(method.substeps):  # PMG: one optimizer step per granularity; others: one
            ctx.substep = substep
            with accelerator.accumulate(model):
                if o.sam is not None:
                    # a copy: timm's mixup mixes the images in place, and the replay must start from the originals
                    kept = tuple(b.clone() if torch.is_tensor(b) else b for b in batch)
                    micro.append((kept, rng_state(), _ctx_position(ctx)))
                out = method.training_step(model, batch, ctx)
                loss = out.loss
                accelerator.backward(loss)
                if o.unfreeze is not None and accelerator.sync_gradients:
                    o.unfreeze.drop_frozen_grads()  # before SAM: its radius is over the trained parameters only
                if o.sam is not None and accelerator.sync_gradients:
                    _sam_second_pass(accelerator, model, method, ctx, o.sam, micro)
                    micro = []
                    if o.unfreeze is not None:
                        o.unfreeze.drop_frozen_grads()
                if accelerator.sync_gradients and o.clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
                optimizer.step()
                stepped = stepped or (accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped)
                if stepped and substep == method.substeps - 1:
                    scheduler.step_update()  # once per batch with a real update: accumulation/fp16 skips don't count
                optimizer.zero_grad(set_to_none=True)
            detached = loss.detach().float()
            if guard is not None:
                guard.observe(detached)
            loss_sum = detached if loss_sum is None else loss_sum + detached  # a batch's steps add up
            for name, value in out.terms.items():  # summed on the device; read once at the epoch end
                value = value.detach().float()
                term_sums[name] = value if name not in term_sums else term_sums[name] + value
        batches += 1
        samples += batch[0].shape[0]
        state.step_in_epoch += 1
        if accelerator.sync_gradients:
            state.global_step += 1
            if guard is not None:
                guard.end_update(state.global_step)
            if o.log_every and state.global_step % o.log_every == 0:
                running = loss_sum.item() / batches  # the only host sync, at log intervals
                bar.set_postfix(loss=f"{running:.4f}")
                accelerator.log({"train/loss_running": running,
                                 "train/lr": optimizer.param_groups[0]["lr"]}, step=state.global_step)
            if on_update is not None:
                on_update(state)
    bar.close()
    mean_loss = accelerator.reduce(loss_sum / max(batches, 1), "mean").item() if batches else float("nan")
    samples = int(accelerator.reduce(torch.tensor(samples, device=accelerator.device), "sum").item())
    terms = {f"train/{name}": accelerator.reduce(total / batches, "mean").item() for name, total in term_sums.items()}
    extra = {} if o.unfreeze is None else {"trainable_params": sum(
        p.numel() for n, p in o.unfreeze.model.named_parameters() if n in o.unfreeze.trainable(state.epoch))}
    return {"train_loss": mean_loss, **terms, "lr": optimizer.param_groups[0]["lr"], "samples": samples,
            "epoch_time": time.perf_counter() - start, **extra}


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, *, method=None, loss_fn: Optional[nn.Module] = None,
             progress: bool = False, desc: str = "eval", cast_inputs: bool = True,
             inputs: Optional[Callable] = None) -> EvalOutput:
    """Logits and labels of every sample in ``loader``, gathered from all processes.

    Logits come from ``method.predict`` (the method's inference, with its test-time flip), or
    from the model's forward without a method. ``gather_for_metrics`` drops the samples that
    distributed samplers duplicate to even out the last batch, so each sample counts exactly
    once; order is the dataset's order. ``cast_inputs=False`` keeps float32 inputs under DeepSpeed
    (for a float32 model beside the engine's, such as the weight EMA). ``inputs`` makes the images
    from what the loader gave (the GPU decode path, ``FitOptions.eval_input``).
    """
    model.eval()
    cast = input_dtype(accelerator) if cast_inputs else None
    predict = method.predict if method is not None else (lambda m, x: m(x))
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False,
                               disable=not (progress and accelerator.is_local_main_process)):
        if inputs is not None:
            images = inputs(images)
        if cast is not None:
            images = images.to(cast)
        logits = predict(model, images).float()
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


def _checkpoint_note(run_dir: Path) -> str:
    """Where the newest complete ``last`` checkpoint is and what it holds, for messages."""
    from fgclf.checkpoint_paths import find_last

    path = find_last(run_dir)
    if path is None:
        return "no checkpoint was written before it"
    st = json.loads((path / "trainer_state.json").read_text())
    where = (f"end of epoch {st['epoch']}" if not st.get("step_in_epoch") else f"in epoch {st['epoch'] + 1}")
    return f"the last good checkpoint is {path} (update {st['global_step']}, {where})"


def fit(accelerator, model: nn.Module, train_loader, val_loader, optimizer, scheduler, method, *,
        state: TrainState, checkpointer, run_dir: str | Path, num_classes: int,
        options: Optional[FitOptions] = None, train_fn: Optional[Callable[..., dict]] = None,
        eval_fn: Optional[Callable[..., EvalOutput]] = None) -> TrainState:
    """Train from ``state`` to ``options.epochs``, validating and checkpointing after every epoch.

    ``method`` computes each training step and each prediction (a bare loss means ``plain``).
    The watched ``options.metric`` (``loss`` is minimised, anything else maximised) selects the
    ``best`` checkpoint and drives early stopping after ``options.patience`` epochs without a
    ``min_delta`` improvement. ``last`` is written at every epoch end (and every
    ``checkpoint_every_steps`` updates) so that ``--resume`` continues from it.
    ``train_fn``/``eval_fn`` replace :func:`train_one_epoch`/:func:`evaluate` (same signatures),
    e.g. with a pipeline-parallel runner's.

    Ending early (:class:`RunGuard`): SIGTERM/SIGINT finish the current update, write ``last``
    and raise :class:`StopTraining`; more than ``max_nonfinite_steps`` consecutive updates with
    a non-finite loss raise :class:`NonFiniteLoss` naming them and the last good checkpoint.
    """
    method, o = _plain(method), options or FitOptions()
    epochs, metric, patience, min_delta = o.epochs, o.metric, o.patience, o.min_delta
    checkpoint_every_steps, max_nonfinite_steps = o.checkpoint_every_steps, o.max_nonfinite_steps
    train_fn, eval_fn = train_fn or train_one_epoch, eval_fn or evaluate
    mode = "min" if metric == "loss" else "max"
    run_dir = Path(run_dir)
    history_path = run_dir / "metrics.jsonl"
    guard = RunGuard(accelerator, max_nonfinite_steps=max_nonfinite_steps)

    def check(st: TrainState, *, epoch_end: bool = False) -> None:
        exceeded, why = guard.poll(), f"more than train.max_nonfinite_steps={max_nonfinite_steps} in a row"
        if exceeded is None and epoch_end and guard.run and not guard.skips_bad_steps:
            exceeded = (guard.run_start, st.global_step)
            why = f"epoch {st.epoch + 1} ended on them; without fp16 loss scaling they were applied to the weights"
        if exceeded is not None:
            first, last = exceeded
            where = f"update {first}" if first == last else f"updates {first}-{last}"
            raise NonFiniteLoss(f"non-finite training loss (nan/inf) at {where} ({why}); {_checkpoint_note(run_dir)}; "
                                "lower optim.lr, set train.clip_grad_norm or check the data")

    def stop(st: TrainState, signum: int, *, saved: bool) -> None:
        if not saved and guard.can_save:
            checkpointer.save_last(st)
            saved = True
        where = f"at epoch {st.epoch + 1}, update {st.global_step}" if st.step_in_epoch else \
            f"at the end of epoch {st.epoch}, update {st.global_step}"
        note = (f"checkpoint written to {checkpointer.last}" if saved else
                f"the latest loss was non-finite, so no checkpoint was written: {_checkpoint_note(run_dir)}")
        raise StopTraining(f"stopped by {signal.Signals(signum).name} {where}; {note}", signum=signum)

    averaged = accelerator.unwrap_model(model, keep_torch_compile=False) if o.ema is not None else None

    def on_update(st: TrainState) -> None:
        if o.ema is not None:  # before any checkpoint of this update: last/ holds the average after it
            o.ema.update(averaged, st.global_step)
        save = bool(checkpoint_every_steps) and st.global_step % checkpoint_every_steps == 0
        if save or guard.due(st.global_step):
            check(st)
        save = save and guard.can_save
        if save:
            checkpointer.save_last(st)
        for callback in o.callbacks:
            callback(st)
        if guard.stopping():
            stop(st, guard.stopping(), saved=save)

    with guard.catch_signals():
        while state.epoch < epochs and not state.stopped_early:
            epoch_start = time.perf_counter()
            loader = train_loader
            if state.step_in_epoch:  # resumed from a mid-epoch checkpoint
                loader = (train_loader.skip(state.step_in_epoch) if hasattr(train_loader, "skip")
                          else accelerator.skip_first_batches(train_loader, state.step_in_epoch))
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)  # same shuffle for epoch e whether resumed or not
            dataset = getattr(train_loader, "dataset", None)
            if hasattr(dataset, "set_epoch"):  # per-sample augmentation seeds (accelerate does not always pass it on)
                dataset.set_epoch(state.epoch)
            record = train_fn(accelerator, model, loader, optimizer, scheduler, method, state=state, options=o,
                              on_update=on_update, guard=guard)
            scheduled = getattr(dataset, "transform", None)
            if hasattr(scheduled, "size"):  # progressive resizing: the crop size this epoch trained at
                record["train_size"] = scheduled.size(state.epoch)
            check(state, epoch_end=True)
            state.epoch += 1
            state.step_in_epoch = 0
            record = {"epoch": state.epoch, "step": state.global_step, **record}
            if val_loader is not None:
                out = eval_fn(accelerator, model, val_loader, method=method, loss_fn=EVAL_LOSS, progress=o.progress,
                              desc="val", **({"inputs": o.eval_input} if o.eval_input is not None else {}))
                scores = compute_metrics(out.logits, out.labels, num_classes=num_classes)
                record.update({"val/loss": out.loss, "val/num_samples": int(len(out.labels)),
                               **{f"val/{k}": v for k, v in scores.items()}})
                value = out.loss if metric == "loss" else scores.get(metric)
                if value is None:
                    raise UserError(f"early_stopping_metric '{metric}' is not computed; use loss or one of "
                                    f"{', '.join(scores)}")
                weights, which = model, "raw"
                if o.ema is not None:  # the average is validated too; the better of the two competes for best
                    o.ema.sync(accelerator)
                    ema_out = evaluate(accelerator, o.ema.module, val_loader, method=method, loss_fn=EVAL_LOSS,
                                       progress=o.progress, desc="val ema", cast_inputs=False, inputs=o.eval_input)
                    ema_scores = compute_metrics(ema_out.logits, ema_out.labels, num_classes=num_classes)
                    record.update({"val_ema/loss": ema_out.loss, **{f"val_ema/{k}": v for k, v in ema_scores.items()}})
                    ema_value = ema_out.loss if metric == "loss" else ema_scores[metric]
                    if _improved(ema_value, value, 0.0, mode):
                        weights, which, value = o.ema.module, "ema", ema_value
                    record["ema_decay"] = o.ema.decay_at(state.global_step)
                if _improved(value, state.best_metric, min_delta, mode):
                    state.best_metric, state.best_epoch, state.bad_epochs = float(value), state.epoch, 0
                    state.best_weights = which
                    checkpointer.save_best(weights, state)
                else:
                    state.bad_epochs += 1
                    if patience and state.bad_epochs >= patience:
                        state.stopped_early = True
            else:  # no validation: the last epoch's weights (the average's, when there is one)
                if o.ema is not None:
                    o.ema.sync(accelerator)
                state.best_epoch = state.epoch
                state.best_weights = "raw" if o.ema is None else "ema"
                checkpointer.save_best(model if o.ema is None else o.ema.module, state)
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
            for callback in o.epoch_callbacks:  # every process: callbacks may run the (wrapped) model
                callback(state)
            guard.poll()  # a signal during validation or the checkpoint: stop now, `last` is this epoch end
            if guard.stopping():
                stop(state, guard.stopping(), saved=True)
    return state
