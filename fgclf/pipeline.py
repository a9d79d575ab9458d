"""Pipeline parallelism (``torch.distributed.pipelining``): one model split into K stages, one per process.

A timm ResNet, EfficientNet or ViT is cut into a sequence of *units* (stem or patch embedding,
every block, head) whose composition is checked to equal the model; the units are grouped into
K contiguous stages balanced by measured forward+backward time (default), FLOPs or parameter
count. Every process builds the whole model (same seed, same weights) and trains only its stage, so:

- data, loss, metrics and the run directory are those of a DDP run: every process walks the same
  batches; stage 0 decodes the images, the last stage holds the labels and computes the loss;
- a step of M microbatches is a GPipe or 1F1B schedule; the gradient is the mean of the
  microbatch losses' gradients, as in a single process that runs the same microbatches;
- checkpoints gather the stages into one ordinary model file (``best/model.safetensors`` loads
  with ``--model.name file:DIR``, no pipelining needed); ``last/`` adds each stage's optimizer,
  scheduler and RNG state for ``--resume``.

Only the stage lives on the accelerator; the rest of each process's copy of the model stays on
the CPU and is only written (gathered weights), never run.
"""
from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fgclf.checkpoint import Checkpointer
from fgclf.engine import TrainState
from fgclf.errors import UserError

SCHEDULES = ("gpipe", "1f1b")
BALANCE = ("time", "flops", "params")


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle share of a GPipe/1F1B step with equal stage costs: ``(K - 1) / (M + K - 1)``."""
    return (stages - 1) / (microbatches + stages - 1)


# ----------------------------------------------------------------------------- units
class _Piece(nn.Module):
    """``fn(model, x)`` over the model parts it uses, registered here (and only those).

    The model is kept outside the module tree, so a stage's parameters are exactly its units'
    parameters; timm's ``forward_head`` reads the model's own ``training`` flag (dropout), so
    ``train()``/``eval()`` are always called on the whole model.
    """

    def __init__(self, model: nn.Module, fn: Callable, modules: Sequence[str] = (), params: Sequence[str] = ()):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_fn", fn)
        for name in modules:
            if isinstance(getattr(model, name, None), nn.Module):
                self.add_module(name, getattr(model, name))
        for name in params:
            if isinstance(getattr(model, name, None), nn.Parameter):
                self.register_parameter(name, getattr(model, name))

    def forward(self, x):
        return self._fn(self._model, x)


def _resnet_units(m) -> list[nn.Module]:
    stem = _Piece(m, lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))), ["conv1", "bn1", "act1", "maxpool"])
    head = _Piece(m, lambda m, x: m.forward_head(x), ["global_pool", "fc"])
    return [stem, *[b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer], head]


def _efficientnet_units(m) -> list[nn.Module]:
    stem = _Piece(m, lambda m, x: m.bn1(m.conv_stem(x)), ["conv_stem", "bn1"])
    head = _Piece(m, lambda m, x: m.forward_head(m.bn2(m.conv_head(x))),
                  ["conv_head", "bn2", "global_pool", "classifier"])
    return [stem, *[b for stage in m.blocks for b in stage], head]


def _vit_units(m) -> list[nn.Module]:
    embed = _Piece(m, lambda m, x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
                   ["patch_embed", "pos_drop", "patch_drop", "norm_pre"], ["cls_token", "reg_token", "pos_embed"])
    head = _Piece(m, lambda m, x: m.forward_head(m.norm(x)), ["norm", "attn_pool", "fc_norm", "head_drop", "head"])
    return [embed, *m.blocks, head]


def _families() -> list[tuple[type, Callable[[nn.Module], list[nn.Module]]]]:
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    return [(ResNet, _resnet_units), (EfficientNet, _efficientnet_units), (VisionTransformer, _vit_units)]


def sequential_units(model: nn.Module) -> list[nn.Module]:
    """The model as a list of modules whose composition is its forward (stem, blocks, head)."""
    for cls, units in _families():
        if isinstance(model, cls):
            return units(model)
    raise UserError(f"pipeline parallelism splits timm ResNet, EfficientNet and ViT models; "
                    f"{type(model).__name__} is none of them (use DDP or DeepSpeed for it)")


def check_units(model: nn.Module, units: Sequence[nn.Module], sample: torch.Tensor, *, atol: float = 1e-5) -> None:
    """Every parameter and buffer in exactly one unit, and the units composed equal ``model`` (eval mode)."""
    owner: dict[int, int] = {}
    for i, unit in enumerate(units):
        for t in [*unit.parameters(), *unit.buffers()]:
            if owner.setdefault(id(t), i) != i:
                raise UserError(f"pipeline split of {type(model).__name__}: a tensor is shared by units "
                                f"{owner[id(t)]} and {i}; this model cannot be split")
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in owner]
    if missing:
        raise UserError(f"pipeline split of {type(model).__name__} leaves out {missing[:3]}; this variant "
                        "cannot be split")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref, out = model(sample), sample
            for unit in units:
                out = unit(out)
    finally:
        model.train(was_training)
    if out.shape != ref.shape or not torch.allclose(out, ref, atol=atol, rtol=1e-4):
        raise UserError(f"pipeline split of {type(model).__name__} does not reproduce its forward "
                        "(a variant with extra steps between blocks?); use DDP or DeepSpeed for it")


@contextmanager
def _measuring(unit: nn.Module, device=None):
    """``unit`` in eval mode (on ``device`` when given) for a measurement, restored afterwards.

    Eval mode leaves BatchNorm statistics and dropout untouched: the model is not changed by
    being measured. timm's ``forward_head`` reads the whole model's ``training`` flag, so a
    :class:`_Piece`'s owner is switched too.
    """
    home, was_training = next((p.device for p in unit.parameters()), torch.device("cpu")), unit.training
    if device is not None:
        unit.to(device)
    unit.eval()
    owner = getattr(unit, "_model", None)
    owner_training = owner.training if owner is not None else None
    if owner is not None:
        owner.training = False
    try:
        yield unit
    finally:
        unit.zero_grad(set_to_none=True)
        if device is not None:
            unit.to(home)
        unit.train(was_training)
        if owner is not None:
            owner.training = owner_training


def unit_costs(units: Sequence[nn.Module], sample: torch.Tensor, balance: str = "time",
               repeats: int = 3, device=None) -> list[float]:
    """Per-unit cost: forward+backward FLOPs, median forward+backward seconds, or parameter count.

    ``flops`` counts with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions,
    the bulk of a CNN's or ViT's work) on ``sample`` where the units are: deterministic, so every
    process computes the same costs and cuts alike. ``time`` runs one unit at a time on ``device``
    (moved there and back, so a model too big for one accelerator can still be measured),
    synchronised on CUDA; it differs between processes and runs, so share one process's result.
    FLOPs miss memory-bound work (ResNet-50's last blocks at 64 px: 47 % of the FLOPs, 74 % of the
    time on CPU). ``params`` balances memory, not work: in a ResNet the early blocks have few
    parameters but most of the FLOPs (high resolution), so it overloads the first stage. All
    measure in eval mode.
    """
    if balance == "params":
        return [float(max(1, sum(p.numel() for p in u.parameters()))) for u in units]
    if balance == "flops":
        return _unit_flops(units, sample)
    if balance != "time":
        raise UserError(f"unknown pp.balance '{balance}'; choose one of {', '.join(BALANCE)}")
    device = torch.device(device or "cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = np.zeros((repeats + 1, len(units)))
    x = sample.to(device)
    for i, unit in enumerate(units):
        with _measuring(unit, device):
            for r in range(repeats + 1):  # the first pass warms up (allocations, kernel selection) and is dropped
                xi = x.detach().requires_grad_(x.is_floating_point())
                sync()
                start = time.perf_counter()
                y = unit(xi)
                y.float().sum().backward()
                sync()
                times[r, i] = time.perf_counter() - start
            x = y.detach()
    return [float(t) for t in np.median(times[1:], axis=0)]


def _unit_flops(units: Sequence[nn.Module], sample: torch.Tensor) -> list[float]:
    """Forward+backward FLOPs of each unit on ``sample`` (the previous unit's output feeds the next)."""
    from torch.utils.flop_counter import FlopCounterMode

    costs, x = [], sample
    for i, unit in enumerate(units):
        with _measuring(unit):
            xi = x.detach().requires_grad_(i > 0 and x.is_floating_point())  # no input gradient into the stem
            with FlopCounterMode(display=False) as counter:
                y = unit(xi)
                y.float().sum().backward()
            costs.append(float(max(1, counter.get_total_flops())))  # a unit without matmuls still costs something
            x = y.detach()
    return costs


def partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty groups minimising the largest sum.

    Returns the ``num_stages + 1`` boundaries: stage ``k`` holds units ``[b[k], b[k+1])``.
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise UserError(f"cannot split {n} units into {num_stages} pipeline stages")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    best = np.full((num_stages + 1, n + 1), inf)
    cut = np.zeros((num_stages + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):  # last group is units j..i-1
                value = max(best[k - 1, j], prefix[i] - prefix[j])
                if value < best[k, i]:
                    best[k, i], cut[k, i] = value, j
    bounds, i = [n], n
    for k in range(num_stages, 0, -1):
        i = cut[k, i]
        bounds.append(int(i))
    return bounds[::-1]


class _ShapeProbeSafe(nn.Module):
    """A stage as the pipeline schedule runs it, safe from torch's shape inference.

    torch 2.11's torch.distributed.pipelining infers the shapes passed between stages by running each
    stage once on zeros, in the stage's training mode under ``no_grad`` and with the global random
    generators: BatchNorm would average those zeros into its running statistics, and dropout would
    draw a mask that an uninterrupted and a resumed run do not both draw (2.14 infers them with its
    buffers and generators restored). A training step always has autograd on (the schedule's backward
    needs it), so a forward without autograd is an evaluation, whose modules are in eval mode already,
    or that probe: it runs in eval mode with the generators forked, every submodule's own mode
    restored after. (A timm head's dropout reads its model's flag, outside the stage: the fork covers it.)
    """

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.stage(x)
        modes = [(m, m.training) for m in self.stage.modules()]
        self.stage.eval()
        try:
            with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                return self.stage(x)
        finally:
            for m, mode in modes:
                m.training = mode


class _Autocast(nn.Module):
    """Run a stage under autocast and hand float32 on to the next stage."""

    def __init__(self, stage: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.stage, self.device_type, self.dtype = stage, device_type, dtype

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.stage(x).float()


# ----------------------------------------------------------------------------- data
class _LabelsOnly(torch.utils.data.Dataset):
    """The labels of an image dataset without decoding images (stages after the first need no pixels)."""

    def __init__(self, dataset):
        self.labels = list(dataset.records.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.zeros(()), self.labels[index]


class PipelineLoader:
    """The same batches in the same order on every pipeline process.

    The order of epoch ``e`` is drawn from ``seed + e`` as accelerate's seedable sampler draws it
    (a data-parallel run of the same seed sees the same batches), and a resumed run sees the
    batches an uninterrupted one would; ``skip(n)`` starts after ``n`` batches without loading them.
    ``pad_last`` repeats the last sample to fill the final batch (evaluation: a pipeline's
    microbatch shape is fixed; the extra rows are cut off again), otherwise a final short batch
    is dropped.
    """

    def __init__(self, dataset, *, batch_size: int, shuffle: bool, seed: int, images: bool = True,
                 num_workers: int = 0, pad_last: bool = False, pin_memory: bool = False):
        self.dataset = dataset if images else _LabelsOnly(dataset)
        self.batch_size, self.shuffle, self.seed, self.pad_last = batch_size, shuffle, seed, pad_last
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n = len(self.dataset)
        if self.shuffle:
            # accelerate's seedable sampler draws epoch e as randperm seeded with seed + e: same order as DDP
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        order = order.tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if batches and len(batches[-1]) < self.batch_size:
            if self.pad_last:
                batches[-1] = batches[-1] + [batches[-1][-1]] * (self.batch_size - len(batches[-1]))
            else:
                batches.pop()
        return batches

    def real_sizes(self) -> list[int]:
        """Samples of each batch that are not padding."""
        n = len(self.dataset)
        return [min(self.batch_size, n - i) for i in range(0, n, self.batch_size)]

    def __len__(self) -> int:
        return len(self._batches())

    def skip(self, n: int) -> "PipelineLoader":
        other = PipelineLoader.__new__(PipelineLoader)
        other.__dict__.update(self.__dict__)
        other._skip = n
        return other

    def __iter__(self):
        batches = self._batches()[self._skip:]
        if not batches:
            return iter(())
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                                pin_memory=self.pin_memory))


# ----------------------------------------------------------------------------- the runner
class PipelineRunner:
    """This process's stage of a pipelined model, its schedule, and the engine hooks around it.

    Args:
        model: The whole model (identical on every process).
        units: ``sequential_units(model)``.
        bounds: ``partition(...)`` boundaries (same on every process).
        stage_index: This process's stage (its rank).
        microbatches: Microbatches per step (the batch must split into equal ones).
        schedule: ``gpipe`` or ``1f1b``.
        loss_fn: ``loss_fn(logits, labels)`` (the last stage computes it per microbatch).
        device: This stage's device.
        autocast_dtype: bf16 autocast inside every stage, or None.
    """

    def __init__(self, model: nn.Module, units: Sequence[nn.Module], bounds: Sequence[int], *, stage_index: int,
                 microbatches: int, schedule: str, loss_fn: Callable, device: torch.device,
                 autocast_dtype: Optional[torch.dtype] = None):
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if schedule not in SCHEDULES:
            raise UserError(f"unknown pp.schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
        if not hasattr(ScheduleGPipe, "eval") or "return_outputs" not in inspect.signature(ScheduleGPipe.step).parameters:
            raise UserError(f"--parallel pipeline needs a torch.distributed.pipelining with eval() and "
                            f"step(return_outputs=) (torch 2.11 and 2.14 are tested); this is torch {torch.__version__}")
        self.model, self.bounds = model, list(bounds)
        self.num_stages, self.stage_index, self.microbatches = len(bounds) - 1, stage_index, microbatches
        self.device = torch.device(device)
        self.module = nn.Sequential(*units[bounds[stage_index]:bounds[stage_index + 1]]).to(self.device)
        owned = {id(t) for t in [*self.module.parameters(), *self.module.buffers()]}
        self.owned_keys = [k for k, v in model.state_dict(keep_vars=True).items() if id(v) in owned]
        for p in model.parameters():  # this process never runs the other stages: no gradients, no optimizer
            if id(p) not in owned:
                p.requires_grad_(False)
        runnable = _ShapeProbeSafe(self.module)
        if autocast_dtype is not None:
            runnable = _Autocast(runnable, self.device.type, autocast_dtype)
        self.stage = PipelineStage(runnable, stage_index, self.num_stages, self.device)
        self.is_first, self.is_last = stage_index == 0, stage_index == self.num_stages - 1
        self.last_rank = dist.get_global_rank(dist.group.WORLD, self.num_stages - 1) if dist.is_initialized() \
            else self.num_stages - 1
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        self.schedule = cls(self.stage, n_microbatches=microbatches,
                            loss_fn=lambda out, y: loss_fn(out.float(), y))

    # -- parameters
    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def _batch(self, t: torch.Tensor) -> torch.Tensor:
        """The whole batch on this stage's device; the schedule cuts it into equal microbatches along dim 0
        (the whole-batch form of ``step``/``eval``: torch 2.14's pre-split ``arg_mbs`` is not in 2.11)."""
        if t.shape[0] % self.microbatches:
            raise UserError(f"a batch of {t.shape[0]} does not split into {self.microbatches} equal microbatches")
        return t.to(self.device)

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[tuple, dict]:
        args = (self._batch(images),) if self.is_first else ()
        return args, ({"target": self._batch(labels)} if self.is_last else {})

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward and backward of one batch; the mean microbatch loss on the last stage, else None."""
        args, kwargs = self._inputs(images, labels)
        losses: list = []
        self.schedule.step(*args, losses=losses if self.is_last else None, return_outputs=False, **kwargs)
        return torch.stack([loss.detach().float() for loss in losses]).mean() if self.is_last else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits of a batch on the last stage (None elsewhere), forward only."""
        args, kwargs = self._inputs(images, labels)
        out = self.schedule.eval(*args, **kwargs)
        return out.float() if self.is_last else None

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of all stages' gradients together (what one process would compute)."""
        import torch.distributed as dist

        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            local += g.detach().double().pow(2).sum()
        dist.all_reduce(local)
        total = float(local.sqrt())
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    def broadcast_from_last(self, obj):
        """An object computed on the last stage, on every process."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=self.last_rank, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_to_main(self) -> None:
        """Copy every stage's current weights and buffers into process 0's whole model (collective)."""
        import torch.distributed as dist

        state = self.model.state_dict()
        piece = {k: state[k].detach().cpu() for k in self.owned_keys}
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(piece, pieces, dst=0)
        if dist.get_rank() == 0:
            merged = {k: v for p in pieces if p for k, v in p.items()}
            missing = set(state) - set(merged)
            if missing:
                raise RuntimeError(f"pipeline gather is missing {sorted(missing)[:3]}")
            self.model.load_state_dict(merged, strict=True)

    # -- engine hooks (signatures of fgclf.engine.train_one_epoch / evaluate)
    def train_one_epoch(self, accelerator, model, loader, optimizer, scheduler, method, *, state, options=None,
                        on_update=None, guard=None) -> dict:
        from tqdm.auto import tqdm

        from fgclf.engine import FitOptions

        o = options or FitOptions()
        parts = getattr(method, "parts", None)
        if getattr(method, "name", "plain") != "plain" or (parts is not None and (
                parts.regularizer is not None or parts.mixup is not None or parts.logit_penalty is not None)):
            raise UserError("pipeline mode runs the plain method without loss.regularizer, loss.confusion or mixup")
        train_mode, progress, log_every, clip_grad_norm = o.train_mode, o.progress, o.log_every, o.clip_grad_norm
        (train_mode or (lambda m: m.train()))(self.model)
        start, loss_sum, batches, samples = time.perf_counter(), torch.zeros((), dtype=torch.float64), 0, 0
        bar = tqdm(loader, desc=f"epoch {state.epoch + 1}", leave=False,
                   disable=not (progress and accelerator.is_local_main_process))
        for images, labels in bar:
            loss = self.step(images, labels)
            if clip_grad_norm:
                self.clip_grad_norm_(clip_grad_norm)
            optimizer.step()
            scheduler.step_update()
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss_sum += loss.double().cpu()
                if guard is not None:  # only the last stage has losses; the guard's poll shares them
                    guard.observe(loss)
            batches += 1
            samples += labels.shape[0]
            state.step_in_epoch += 1
            state.global_step += 1
            if guard is not None:
                guard.end_update(state.global_step)
            if log_every and state.global_step % log_every == 0:
                running = self.broadcast_from_last(float(loss_sum) / batches)
                bar.set_postfix(loss=f"{running:.4f}")
                accelerator.log({"train/loss_running": running, "train/lr": optimizer.param_groups[0]["lr"]},
                                step=state.global_step)
            if on_update is not None:
                on_update(state)
        bar.close()
        mean_loss = self.broadcast_from_last(float(loss_sum) / batches if batches else float("nan"))
        return {"train_loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "samples": samples,
                "epoch_time": time.perf_counter() - start}

    def evaluate(self, accelerator, model, loader, *, method=None, loss_fn=None, progress=False, desc="eval"):
        from tqdm.auto import tqdm

        from fgclf.engine import EvalOutput

        if method is not None and method.parts.tta_flip:
            raise UserError("pipeline mode does not support train.tta_flip yet")
        self.model.eval()
        all_logits, all_labels = [], []
        sizes = loader.real_sizes()
        for (images, labels), n in zip(tqdm(loader, desc=desc, leave=False,
                                            disable=not (progress and accelerator.is_local_main_process)), sizes):
            logits = self.forward(images, labels)
            if self.is_last:
                all_logits.append(logits[:n].cpu())
            all_labels.append(labels[:n])
        logits = torch.cat(all_logits) if all_logits else torch.empty(0)
        logits = self.broadcast_from_last(logits if self.is_last else None)
        labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
        loss = float(loss_fn(logits, labels)) if (loss_fn is not None and len(labels)) else float("nan")
        return EvalOutput(logits.numpy(), labels.numpy(), loss)


def build_runner(model: nn.Module, *, sample: torch.Tensor, num_stages: int, stage_index: int, microbatches: int,
                 schedule: str, balance: str, loss_fn: Callable, device, autocast_dtype=None,
                 costs: Optional[Sequence[float]] = None,
                 bounds: Optional[Sequence[int]] = None) -> tuple[PipelineRunner, list[int], list[float]]:
    """Check the split, balance it, and build this process's runner: (runner, bounds, unit costs).

    ``costs`` (e.g. measured on process 0 and shared) overrides the per-unit costs, so that every
    process cuts at the same places even when ``balance="time"`` measures differently on each;
    ``bounds`` (a resumed run's) overrides the balancing altogether.
    """
    units = sequential_units(model)
    check_units(model, units, sample)
    if costs is None:
        costs = unit_costs(units, sample, balance if bounds is None else "params", device=device)
    if bounds is None:
        bounds = partition(costs, num_stages)
    elif len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != len(units) or \
            any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise UserError(f"the checkpoint's pipeline split {list(bounds)} does not fit {num_stages} stages of "
                        f"{len(units)} units; resume with the process count it was trained with")
    runner = PipelineRunner(model, units, bounds, stage_index=stage_index, microbatches=microbatches,
                            schedule=schedule, loss_fn=loss_fn, device=device, autocast_dtype=autocast_dtype)
    return runner, bounds, list(costs)


def stage_summary(units: Sequence[nn.Module], bounds: Sequence[int], costs: Sequence[float]) -> list[dict]:
    """Per stage: unit range, parameters and share of the cost (for the run's config and the log)."""
    total = sum(costs) or 1.0
    out = []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        out.append({"stage": k, "units": [a, b], "parameters": sum(p.numel() for u in units[a:b] for p in u.parameters()),
                    "cost_share": round(sum(costs[a:b]) / total, 4)})
    return out


class PipelineCheckpointer(Checkpointer):
    """``last/`` and ``best/`` of a pipeline run, written from the gathered stages.

    ``best/`` is the ordinary export (one model file). ``last/`` holds the whole model
    (``model.safetensors``) plus ``pipeline/stage<k>.pt`` per stage: its optimizer, scheduler and
    RNG state (plain tensors and numbers, read back with ``weights_only=True``).
    """

    def __init__(self, accelerator, run_dir, *, meta: dict, runner: PipelineRunner):
        super().__init__(accelerator, run_dir, meta=meta)
        self.runner, self.optimizer, self.scheduler = runner, None, None

    def track(self, optimizer, scheduler) -> None:
        """The stage's optimizer and lr scheduler, saved in ``last/`` (call before training)."""
        self.optimizer, self.scheduler = optimizer, scheduler

    def save_best(self, model, state) -> None:
        self.runner.gather_to_main()
        super().save_best(model, state)

    def save_last(self, state) -> None:
        """The gathered model, the split and the counters (process 0) plus each stage's optimizer,
        scheduler and RNG state (every process), through :meth:`Checkpointer._write` (temp folder,
        fsync, rename; a full disk leaves the previous ``last`` and says so on every process)."""
        import random

        from safetensors.torch import save_file

        from fgclf.runtime import debug_fault
        from fgclf.utils import atomic_write_json

        self.runner.gather_to_main()

        def write_stage(tmp: Path) -> None:
            (tmp / "pipeline").mkdir(exist_ok=True)
            py_version, py_state, py_gauss = random.getstate()
            np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                        "py_rng": [py_version, list(py_state), py_gauss],  # plain lists: loadable with weights_only
                        "np_rng": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                                   int(np_has_gauss), float(np_gauss)]},
                       tmp / "pipeline" / f"stage{self.runner.stage_index}.pt")
            debug_fault("save_last", tmp)  # test hook: a kill or a full disk in the middle of the write

        def write_model(tmp: Path) -> None:
            sd = {k: v.detach().cpu().contiguous() for k, v in self.runner.model.state_dict().items()}
            save_file(sd, str(tmp / "model.safetensors"))
            atomic_write_json(tmp / "pipeline" / "meta.json", {"bounds": self.runner.bounds,
                                                               "stages": self.runner.num_stages})
            atomic_write_json(tmp / "trainer_state.json", state.to_dict())
            atomic_write_json(tmp / "config.json", self.meta)

        self._write(self.last, every_process=write_stage, main_process=write_model)

    def load_last(self, ckpt_dir=None) -> TrainState:
        import json

        from safetensors.torch import load_file

        ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else self.last
        self.check_compatible(ckpt_dir)
        stage_file = ckpt_dir / "pipeline" / f"stage{self.runner.stage_index}.pt"
        if not (ckpt_dir / "model.safetensors").is_file() or not stage_file.is_file():
            raise UserError(f"no pipeline checkpoint for stage {self.runner.stage_index} at {ckpt_dir} "
                            "(was it written by a pipeline run with as many stages?)")
        self.runner.model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")), strict=True)
        saved = torch.load(stage_file, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if saved.get("py_rng") is not None:
            import random

            version, state, gauss = saved["py_rng"]
            random.setstate((version, tuple(state), gauss))
            name, keys, pos, has_gauss, cached = saved["np_rng"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda_rng"])
        return TrainState(**json.loads((ckpt_dir / "trainer_state.json").read_text()))


def setup_pipeline(accelerator, model: nn.Module, datasets: dict, *, input_size: Sequence[int], stages: Optional[int],
                   microbatches: int, schedule: str, balance: str, batch_size: int, num_workers: int, seed: int,
                   loss_fn: Callable, resume_dir: Optional[Path] = None) -> tuple[PipelineRunner, dict, list[dict]]:
    """This process's stage and the pipeline loaders of ``datasets`` (``train``/``val``/``test``).

    A resumed run (``resume_dir``) reuses the split its checkpoint was trained with, so every
    stage's optimizer state meets the same parameters. After the split every process but the first
    reseeds its torch RNG by its rank: otherwise every stage would draw the same
    dropout and drop-path masks, which one process running the whole model never does.

    Returns ``(runner, loaders, stages summary)``; ``loaders["val"]`` is None for an empty split.
    """
    from accelerate.utils import DistributedType

    from fgclf.runtime import broadcast_from_main

    n = accelerator.num_processes
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_XPU, DistributedType.MULTI_NPU) or n < 2:
        raise UserError(f"--parallel pipeline needs one process per stage under a plain multi-process accelerate "
                        f"config (got {n} process(es), {accelerator.distributed_type.value})")
    if stages is not None and stages != n:
        raise UserError(f"pp.stages is {stages} but accelerate started {n} processes; one process runs each stage")
    if str(accelerator.mixed_precision) == "fp16":
        raise UserError("pipeline mode supports bf16 or no mixed precision, not fp16 (no loss scaling across stages)")
    if schedule == "1f1b" and microbatches < n:
        raise UserError(f"pp.schedule 1f1b needs at least as many microbatches as stages ({microbatches} < {n})")
    saved = None
    if resume_dir is not None and (Path(resume_dir) / "pipeline" / "meta.json").is_file():
        import json

        saved = json.loads((Path(resume_dir) / "pipeline" / "meta.json").read_text())["bounds"]
    autocast = torch.bfloat16 if str(accelerator.mixed_precision) == "bf16" else None
    sample = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    costs = None
    if balance == "time" and saved is None:  # measured once, on process 0 at the microbatch size: every process cuts alike
        timing = torch.randn(min(32, max(2, batch_size // microbatches)), *input_size)
        costs = broadcast_from_main(accelerator, lambda: unit_costs(sequential_units(model), timing, "time",
                                                                    device=accelerator.device))
    runner, bounds, costs = build_runner(model, sample=sample, num_stages=n, stage_index=accelerator.process_index,
                                         microbatches=microbatches, schedule=schedule, balance=balance,
                                         loss_fn=loss_fn, device=accelerator.device, autocast_dtype=autocast,
                                         costs=costs, bounds=saved)
    if accelerator.process_index:  # per-stage dropout streams (CUDA included); process 0 keeps its own
        torch.manual_seed(seed + 7919 * accelerator.process_index)
    pin = accelerator.device.type == "cuda"
    loaders = {}
    for split, ds in datasets.items():
        if ds is None or len(ds) == 0:
            loaders[split] = None
            continue
        train = split == "train"
        loaders[split] = PipelineLoader(ds, batch_size=batch_size, shuffle=train, seed=seed, pad_last=not train,
                                        images=runner.is_first, num_workers=num_workers if runner.is_first else 0,
                                        pin_memory=pin)
    if len(loaders["train"]) == 0:
        raise UserError(f"pipeline mode drops a final short batch, and {len(datasets['train'])} training images "
                        f"make no full batch of {batch_size}")
    return runner, loaders, stage_summary(sequential_units(model), bounds, costs)


def microbatch_reference_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: Callable,
                              microbatches: int) -> torch.Tensor:
    """What one process computes for a pipelined step: backward of the mean microbatch loss.

    Returns the mean loss; gradients accumulate in ``model`` (call the optimizer afterwards).
    """
    losses = []
    for x, y in zip(images.chunk(microbatches), labels.chunk(microbatches)):
        loss = loss_fn(model(x).float(), y)
        (loss / microbatches).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


__all__ = ["BALANCE", "SCHEDULES", "PipelineCheckpointer", "PipelineLoader", "PipelineRunner", "bubble_fraction", "build_runner",
           "check_units", "microbatch_reference_step", "partition", "sequential_units", "setup_pipeline",
           "stage_summary", "unit_costs"]
