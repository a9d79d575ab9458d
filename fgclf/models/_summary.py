"""Model accounting: a torchsummary-like layer table, exact parameter totals, and the training
memory of a model, estimated from its architecture and measured.

Public API::

    summarize_model(model, *, input_size=(3, 224, 224), batch_size=1, device=None, rows="leaf")
    format_summary(summary) -> str
    estimate_training_memory(model, *, input_size, batch_size, optimizer="adamw", precision="fp32")
    measure_training_memory(model, *, input_size, batch_size, optimizer="adamw", steps=2, threads=None,
                            allocator="live")
    format_memory(estimate, measured=None) -> str

Conventions
-----------
Rows come from forward hooks, one row per *call*, numbered ``Type-N`` in the order the calls
finish (torchsummary's ``module_idx + 1``). ``rows="leaf"`` (default) hooks modules without
children and skips ``nn.Identity`` (timm's placeholder for a disabled option: no work, and its
output is its input). ``rows="torchsummary"`` hooks what torchsummary 1.5 hooks, every module but
``Sequential``/``ModuleList``/``ModuleDict`` and the root, and counts a row's parameters as
torchsummary does (``.weight`` + ``.bias``). On torchvision's resnet18 that mode gives torchsummary's
table row for row (``Linear-68``); timm's resnet18 computes the same function with other modules
(``drop_block``/``aa`` Identities, ``SelectAdaptivePool2d`` + ``Flatten``), so it numbers
``Linear-61`` in leaf mode and ``Linear-86`` in torchsummary mode.

Totals never come from the rows: parameters are ``sum(p.numel())`` over unique parameters, split
into trainable / frozen by ``requires_grad``; buffers (BatchNorm ``running_mean/var`` and
``num_batches_tracked``) are counted apart. Sizes use each tensor's own dtype; MB = 2**20 bytes.

Where the numbers differ
------------------------
* Row sums vs. the total: parameters held by a non-leaf module itself (ViT ``cls_token``,
  ``pos_embed``), modules never called (PEFT's frozen ``original_module`` copy of a saved head),
  and torchsummary's weight+bias rule (misses e.g. LayerScale ``gamma``) make row sums smaller;
  ``ModelSummary.unattributed`` names them. A module called twice makes torchsummary's sum
  larger; here its later rows are marked ``repeat`` (``*`` in the table) and not summed again.
* ``activation_mb`` is torchsummary's "forward/backward pass size": 2 x the bytes of every row's
  output (x2 for the gradients). It over-counts outputs that share memory (in-place ReLU writes
  into the BatchNorm output, ``Flatten``/views, block outputs in torchsummary mode) and
  under-counts what autograd keeps that is not a module output (residual adds, attention
  matmuls and softmax, GELU inputs, BatchNorm statistics, dropout masks) and the gradients that
  coexist with it. ``saved_mb`` counts instead the tensors autograd really saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters and input
  excluded): this is the activation term of :func:`estimate_training_memory`.
* The estimate is ``weights + buffers + gradients (trainable) + optimizer state + saved
  activations + workspace + input``, where ``workspace`` = 2 x the largest single activation
  (the gradient of that activation and the one it produces exist together in backward, and a
  frozen body's forward holds a layer's input and output). It is meant to err high: it lets
  every gradient, every saved tensor and the workspace coexist, while in backward the saved
  tensors of a layer are freed as its gradients appear (measured on CPU, 224 px: 1.08-1.17x for
  full fine-tuning of resnet18 / vit_tiny, 0.87x for a resnet18 linear probe, whose peak is the
  frozen forward's transients). Not modelled: allocator caching, optimizer temporaries, autocast
  weight copies, cuDNN/oneDNN workspaces.
* On CPU, glibc keeps freed memory for reuse, so the process RSS peak can be well above the live
  tensor peak (1.35x for resnet18 at batch 8, 224 px). :func:`measure_training_memory` therefore
  measures in a fresh interpreter with ``mallopt`` setting the mmap threshold to 64 KiB and
  the trim threshold to 0 (``allocator="live"``): every tensor is its own mapping returned on
  free and RSS follows live tensors, the CPU analogue of ``torch.cuda.max_memory_allocated``.
  ``allocator="default"`` measures what ``top`` would show. RSS also grows by the library code
  (``libtorch``) that the first step pages in, about 20 MB; that is file-backed, not training
  memory, and the measurement takes the growth of ``RssFile`` off.
"""
from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from fgclf.errors import UserError

MB = 2 ** 20
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}  # state tensors per trainable parameter
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ROW_MODES = ("leaf", "torchsummary")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class LayerRow:
    """One module call: ``label`` is torchsummary's ``Type-N``; shapes have -1 for the batch."""

    index: int
    name: str
    type: str
    output_shape: tuple
    output_bytes: int  # at the summary's batch size
    params: int
    trainable: int
    repeat: bool = False  # the module ran before: its parameters are not summed again

    @property
    def label(self) -> str:
        return f"{self.type}-{self.index}"


@dataclass
class ModelSummary:
    """Per-call rows plus exact totals (see the module docstring for the conventions)."""

    rows: list[LayerRow]
    input_size: tuple
    batch_size: int
    mode: str
    total_params: int
    trainable_params: int
    buffers: int  # elements in buffers (BatchNorm running stats and counters), not parameters
    param_bytes: int
    buffer_bytes: int
    input_bytes: int
    saved_bytes: int  # unique tensors autograd saved for backward in this forward
    largest_bytes: int  # largest single activation (row output or saved tensor)
    unattributed: dict[str, int] = field(default_factory=dict)  # parameter name -> numel

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def row_params(self) -> int:
        """Sum of the rows' parameter counts (what torchsummary prints as its total)."""
        return sum(r.params for r in self.rows if not r.repeat)

    @property
    def param_mb(self) -> float:
        return self.param_bytes / MB

    @property
    def buffer_mb(self) -> float:
        return self.buffer_bytes / MB

    @property
    def input_mb(self) -> float:
        return self.input_bytes / MB

    @property
    def output_mb(self) -> float:
        return sum(r.output_bytes for r in self.rows) / MB

    @property
    def activation_mb(self) -> float:
        """torchsummary's forward/backward pass size: 2 x the rows' output bytes."""
        return 2 * self.output_mb

    @property
    def saved_mb(self) -> float:
        return self.saved_bytes / MB


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _unique_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    return {id(p): (n, p) for n, p in model.named_parameters(remove_duplicate=True)}


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse / exotic subclasses: count the tensor itself
        return id(t), t.numel() * t.element_size()


def _hooked(module: nn.Module, model: nn.Module, mode: str) -> bool:
    if mode == "leaf":
        return next(module.children(), None) is None and not isinstance(module, nn.Identity)
    return module is not model and not isinstance(module, _CONTAINERS)


def _row_params(module: nn.Module, mode: str) -> tuple[int, int]:
    if mode == "torchsummary":  # torchsummary: .weight and .bias only, all trainable if weight is
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        n = sum(t.numel() for t in (weight, bias) if isinstance(t, torch.Tensor))
        return n, n if isinstance(weight, torch.Tensor) and weight.requires_grad else 0
    own = _counted_params(module, mode)
    return sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


def _shape(output: Any) -> tuple:
    if isinstance(output, torch.Tensor):
        return (-1, *output.shape[1:]) if output.dim() else ()
    if isinstance(output, (list, tuple)):
        return tuple(_shape(o) for o in output)
    return ()


def _counted_params(module: nn.Module, mode: str) -> list[torch.Tensor]:
    """The parameters a row counts (see ``_row_params``)."""
    if mode == "torchsummary":
        return [t for t in (getattr(module, "weight", None), getattr(module, "bias", None))
                if isinstance(t, nn.Parameter)]
    return list(module.parameters(recurse=False))


def _probe(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[list[dict], set[int], int, int]:
    """One forward with hooks: row dicts, ids of counted parameters, saved bytes, largest activation bytes."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    rows: list[dict] = []
    seen: set[int] = set()
    counted: set[int] = set()
    excluded = {_storage_key(p)[0] for p in model.parameters()} | {_storage_key(x)[0]}
    saved: dict[int, tuple[int, torch.Tensor]] = {}  # the reference keeps the address unique

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        params, trainable = _row_params(module, mode)
        rows.append(dict(index=len(rows) + 1, name=names.get(id(module), "?"), type=type(module).__name__,
                         output_shape=_shape(output), repeat=id(module) in seen, params=params,
                         trainable=trainable,
                         output_bytes=sum(t.numel() * t.element_size() for t in _tensors(output))))
        seen.add(id(module))
        counted.update(id(p) for p in _counted_params(module, mode))

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in excluded:
            saved[key] = (nbytes, t)
        return t

    handles = [m.register_forward_hook(hook) for m in model.modules() if _hooked(m, model, mode)]
    buffers = [(b, b.clone()) for b in model.buffers()]  # BatchNorm statistics move in train mode
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    except Exception as e:  # wrong input size for a fixed-size model, and similar
        raise UserError(f"forward of {type(model).__name__} failed at input {tuple(x.shape)}: "
                        f"{type(e).__name__}: {str(e)[:300]}") from None
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, copy_ in buffers:
                b.copy_(copy_)
    sizes = [r["output_bytes"] for r in rows] + [b for b, _ in saved.values()]
    largest = max(sizes + [t.numel() * t.element_size() for t in _tensors(out)], default=0)
    del out
    return rows, counted, sum(b for b, _ in saved.values()), largest


def summarize_model(model: nn.Module, *, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1,
                    device: Optional[str | torch.device] = None, rows: str = "leaf") -> ModelSummary:
    """Run one forward with hooks and count parameters, buffers and activations.

    The forward runs in the model's current mode (train mode saves what training saves; call
    your strategy's train-mode function first); BatchNorm statistics and the RNG are restored.
    Batch 1 is run at batch 2 (BatchNorm in train mode) and its byte counts halved.

    Args:
        model: any ``nn.Module`` taking one image batch.
        input_size: (C, H, W) of one sample.
        batch_size: batch the byte counts refer to (shapes print -1).
        device: where to build the input; None: the model's device.
        rows: ``"leaf"`` or ``"torchsummary"`` (module docstring).

    Returns:
        A :class:`ModelSummary`.
    """
    if rows not in ROW_MODES:
        raise UserError(f"unknown rows mode '{rows}'; known: {', '.join(ROW_MODES)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    probe_batch = max(batch_size, 2)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # input and dropout
        x = torch.randn(probe_batch, *input_size, device=device, dtype=dtype)
        row_dicts, counted, saved, largest = _probe(model, x, rows)
    scale = batch_size / probe_batch
    params = _unique_params(model)
    buffers = list(model.buffers())
    return ModelSummary(
        rows=[LayerRow(**{**r, "output_bytes": int(r["output_bytes"] * scale)}) for r in row_dicts],
        input_size=tuple(input_size), batch_size=batch_size, mode=rows,
        total_params=sum(p.numel() for _, p in params.values()),
        trainable_params=sum(p.numel() for _, p in params.values() if p.requires_grad),
        buffers=sum(b.numel() for b in buffers),
        param_bytes=sum(p.numel() * p.element_size() for _, p in params.values()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        input_bytes=batch_size * math.prod(input_size) * x.element_size(),
        saved_bytes=int(saved * scale), largest_bytes=int(largest * scale),
        unattributed={n: p.numel() for i, (n, p) in params.items() if i not in counted},
    )


def format_summary(summary: ModelSummary) -> str:
    """A torchsummary-style table (plus module names and trainable counts) and the totals."""
    line, double = "-" * 104, "=" * 104
    out = [line, f"{'Layer (type)':>24}  {'Module':<34} {'Output Shape':>22} {'Param #':>11} {'Trainable':>9}", double]
    for r in summary.rows:
        one_tensor = r.output_shape and isinstance(r.output_shape[0], int)
        shape = str(list(r.output_shape)) if one_tensor else str(r.output_shape)
        params = f"{r.params:,}" + ("*" if r.repeat and r.params else "")
        name = r.name if len(r.name) <= 34 else "..." + r.name[-31:]  # the end says most (peft prefixes)
        out.append(f"{r.label:>24}  {name:<34} {shape:>22} {params:>11} {r.trainable:>9,}")
    s = summary
    out += [double, f"Total params: {s.total_params:,}", f"Trainable params: {s.trainable_params:,}",
            f"Non-trainable params: {s.frozen_params:,}",
            f"Buffers (not parameters): {s.buffers:,}"]
    if s.row_params != s.total_params:
        names = ", ".join(list(s.unattributed)[:4]) + (", ..." if len(s.unattributed) > 4 else "")
        out.append(f"Sum over rows: {s.row_params:,} (not in any row: {sum(s.unattributed.values()):,}"
                   + (f" in {names}" if names else "") + ")")
    fwd = 2 * s.output_mb
    out += [line, f"Batch size: {s.batch_size} (rows: {s.mode})", f"Input size (MB): {s.input_mb:.2f}",
            f"Forward/backward pass size (MB): {fwd:.2f}  [torchsummary: 2 x row outputs]",
            f"Saved for backward (MB): {s.saved_mb:.2f}  [autograd saved tensors]",
            f"Params size (MB): {s.param_mb:.2f}", f"Buffers size (MB): {s.buffer_mb:.2f}",
            f"Estimated Total Size (MB): {s.input_mb + fwd + s.param_mb:.2f}  [torchsummary's sum]", line]
    return "\n".join(out)


def _check_choice(kind: str, value: str, known: dict) -> None:
    if value not in known:
        raise UserError(f"unknown {kind} '{value}'; known: {', '.join(known)}")


def estimate_training_memory(model: nn.Module, *, input_size: Sequence[int], batch_size: int,
                             optimizer: str = "adamw", precision: str = "fp32") -> dict[str, Any]:
    """Peak training memory from the architecture, part by part (MB = 2**20 bytes).

    ``weights`` (parameters + buffers) + ``gradients`` (trainable parameters) + ``optimizer``
    (adam/adamw: 2 states, sgd with momentum: 1, none: 0, per trainable parameter, in its dtype)
    + ``activations`` (autograd's saved tensors) + ``workspace`` (2 x the largest activation)
    + ``input``. Activations come from two hooked forwards (batch 2 and 4) extrapolated linearly to
    ``batch_size``; ``bf16``/``fp16`` scale them by 2/4 (autocast keeps fp32 master weights,
    gradients and optimizer state; its fp32 ops and cached weight casts are not modelled).

    Returns:
        ``{"weights_mb", "gradients_mb", "optimizer_mb", "activations_mb", "workspace_mb",
        "input_mb", "total_mb", "torchsummary_activations_mb", "batch_size", "optimizer",
        "precision", "trainable_params"}``.
    """
    _check_choice("optimizer", optimizer, OPTIMIZER_STATES)
    _check_choice("precision", precision, PRECISION_BYTES)
    small, large = (summarize_model(model, input_size=input_size, batch_size=b) for b in (2, 4))

    def at_batch(a: float, b: float) -> float:  # affine in the batch size, through (2, a) and (4, b)
        return max(0.0, a + (b - a) / 2 * (batch_size - 2))

    _, dtype = _model_device_dtype(model)
    scale = PRECISION_BYTES[precision] / torch.empty((), dtype=dtype).element_size()
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    parts = {
        "weights_mb": (small.param_bytes + small.buffer_bytes) / MB,
        "gradients_mb": trainable_bytes / MB,
        "optimizer_mb": OPTIMIZER_STATES[optimizer] * trainable_bytes / MB,
        "activations_mb": at_batch(small.saved_mb, large.saved_mb) * scale,
        "workspace_mb": 2 * at_batch(small.largest_bytes, large.largest_bytes) * scale / MB,
        "input_mb": small.input_mb / 2 * batch_size,
    }
    return {**parts, "total_mb": sum(parts.values()),
            "torchsummary_activations_mb": at_batch(small.activation_mb, large.activation_mb) * scale,
            "batch_size": batch_size, "optimizer": optimizer, "precision": precision,
            "trainable_params": small.trainable_params}


# ---------------------------------------------------------------------------------------------
# measurement


def _rss_mb(key: str = "VmRSS") -> float:
    """A field of ``/proc/self/status`` in MB (0 when the kernel does not report it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    if key in ("VmRSS", "VmHWM"):
        raise OSError(f"{key} not in /proc/self/status")
    return 0.0


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _use_live_allocator() -> bool:
    """glibc: every block >= 64 KiB is its own mmap, freed memory goes back at once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 0))
    except (OSError, AttributeError):
        return False


def _train_steps(model: nn.Module, x: torch.Tensor, optimizer: str, steps: int, before_step, after_step) -> list[float]:
    """``steps`` forward/backward/optimizer steps; ``after_step()`` returns each step's peak."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adam": lambda: torch.optim.Adam(params, lr=1e-4), "adamw": lambda: torch.optim.AdamW(params, lr=1e-4),
           "sgd": lambda: torch.optim.SGD(params, lr=1e-4, momentum=0.9), "none": lambda: None}[optimizer]()
    peaks = []
    for _ in range(steps):
        before_step()
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        loss = nn.functional.cross_entropy(out.float(), target) if out.dim() == 2 else out.float().mean()
        if loss.requires_grad:
            loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None  # zero_grad(set_to_none=True)
        del out, loss
        peaks.append(after_step())
    return peaks


def _measure_cpu_child() -> None:
    """Child process (``python -c``): read the job from stdin, train, print one JSON result line."""
    job = pickle.loads(sys.stdin.buffer.read())
    live = _use_live_allocator() if job["live"] else False  # before the model's tensors exist
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    model = pickle.loads(job.pop("model"))
    _, dtype = _model_device_dtype(model)
    base, base_file = _rss_mb(), _rss_mb("RssFile")
    x = torch.randn(*job["shape"], dtype=dtype)  # after the baseline: the input batch is part of the peak

    def step_peak() -> float:
        # RSS also counts library code paged in as new kernels first run (~20 MB of libtorch in the
        # first step): file-backed, not training memory, so the growth of RssFile is taken off
        return _rss_mb("VmHWM") - base - max(0.0, _rss_mb("RssFile") - base_file)

    resettable = _reset_peak_rss()
    peaks = _train_steps(model, x, job["optimizer"], job["steps"], _reset_peak_rss, step_peak)
    file_growth = _rss_mb("RssFile") - base_file
    print(json.dumps({"peaks": peaks, "baseline_mb": base, "live_allocator": live, "peak_reset": resettable,
                      "file_backed_growth_mb": file_growth}))


def _measure_cpu(model: nn.Module, shape: tuple, optimizer: str, steps: int, threads: Optional[int],
                 allocator: str) -> dict[str, Any]:
    """Measure in a fresh interpreter (clean allocator and high-water mark; no ``__main__`` re-import)."""
    if not os.path.exists("/proc/self/status"):
        raise UserError("measuring CPU memory reads /proc/self/status (Linux); use estimate_training_memory")
    try:
        blob = pickle.dumps(model)
    except Exception as e:
        raise UserError(f"cannot measure {type(model).__name__} in a subprocess: it does not pickle "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    job = pickle.dumps({"model": blob, "shape": shape, "optimizer": optimizer, "steps": steps,
                        "threads": threads, "live": allocator == "live"})
    del blob
    code = ("import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
            "from fgclf.models._summary import _measure_cpu_child; _measure_cpu_child()")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([p or os.getcwd() for p in sys.path])], input=job,
                          capture_output=True)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement process failed (exit code {proc.returncode}; "
                           f"-9 means out of memory):\n{proc.stderr.decode(errors='replace')[-3000:]}")
    result = json.loads(lines[-1])
    method = "peak RSS, fresh process, " + ("live allocator" if result["live_allocator"] else "default glibc malloc")
    return {**result, "method": method}


def _measure_cuda(model: nn.Module, shape: tuple, optimizer: str, steps: int) -> dict[str, Any]:
    device = _model_device_dtype(model)[0]
    model = copy.deepcopy(model)  # the caller's weights stay untouched
    _, dtype = _model_device_dtype(model)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device) / MB
    x = torch.randn(*shape, device=device, dtype=dtype)

    def reset() -> None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def peak() -> float:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MB - base

    peaks = _train_steps(model, x, optimizer, steps, reset, peak)
    return {"peaks": peaks, "baseline_mb": base, "method": "torch.cuda.max_memory_allocated"}


def measure_training_memory(model: nn.Module, *, input_size: Sequence[int], batch_size: int, optimizer: str = "adamw",
                            steps: int = 2, threads: Optional[int] = None, allocator: str = "live") -> dict[str, Any]:
    """Run real training steps on a copy of ``model`` and measure the peak, next to the estimate.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation after the model was copied.
    CPU: peak RSS (``VmHWM``, reset per step through ``/proc/self/clear_refs``) above the RSS
    after the model was unpickled, in a fresh interpreter (a clean allocator and high-water mark),
    less the growth of file-backed RSS (library code paged in by the first step);
    ``allocator`` "live" or "default" as in the module docstring. Either way the model's
    own tensors (parameters + buffers, which the baseline holds) are added back, so
    ``measured_mb`` is comparable to the estimate's ``total_mb``. The model must pickle on CPU.

    Args:
        model: the model as it will train (frozen parameters and modes set).
        input_size: (C, H, W).
        batch_size: images per step.
        optimizer: adam, adamw, sgd (momentum 0.9) or none.
        steps: training steps; the peak is the largest (step 1 has no optimizer state yet).
        threads: CPU threads in the child (None: torch's default).
        allocator: "live" or "default" (CPU only).

    Returns:
        ``{"measured_mb", "estimate_mb", "ratio" (estimate / measured), "peak_per_step_mb",
        "baseline_mb", "method", "device", "estimate" (the full estimate dict)}``.
    """
    _check_choice("optimizer", optimizer, OPTIMIZER_STATES)
    _check_choice("allocator", allocator, {"live": 1, "default": 1})
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    estimate = estimate_training_memory(model, input_size=input_size, batch_size=batch_size, optimizer=optimizer)
    device, _ = _model_device_dtype(model)
    shape = (batch_size, *input_size)
    if device.type == "cuda":
        result = _measure_cuda(model, shape, optimizer, steps)
    else:
        result = _measure_cpu(model, shape, optimizer, steps, threads, allocator)
    model_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / MB
    peaks = [p + model_mb for p in result["peaks"]]
    measured = max(peaks)
    return {"measured_mb": measured, "estimate_mb": estimate["total_mb"], "ratio": estimate["total_mb"] / measured,
            "peak_per_step_mb": peaks, "baseline_mb": result["baseline_mb"], "method": result["method"],
            "device": str(device), "batch_size": batch_size, "optimizer": optimizer, "estimate": estimate,
            **{k: result[k] for k in ("file_backed_growth_mb", "peak_reset") if k in result}}


def format_memory(estimate: dict[str, Any], measured: Optional[dict[str, Any]] = None) -> str:
    """The estimate part by part, and the measurement with its ratio when given."""
    e = estimate
    lines = [f"Training memory estimate (batch {e['batch_size']}, {e['optimizer']}, {e['precision']}):"]
    for key, what in (("weights_mb", "weights + buffers"), ("gradients_mb", "gradients (trainable)"),
                      ("optimizer_mb", "optimizer state"), ("activations_mb", "activations saved for backward"),
                      ("workspace_mb", "workspace (2 x largest activation)"), ("input_mb", "input batch")):
        lines.append(f"  {what:<36} {e[key]:>10.1f} MB")
    lines.append(f"  {'total':<36} {e['total_mb']:>10.1f} MB")
    lines.append(f"  (torchsummary's activation convention would give {e['torchsummary_activations_mb']:.1f} MB)")
    if measured is not None:
        steps = ", ".join(f"{p:.1f}" for p in measured["peak_per_step_mb"])
        lines += [f"Measured peak: {measured['measured_mb']:.1f} MB ({measured['method']}; per step: {steps})",
                  f"Estimate / measured: {measured['ratio']:.2f}"]
    return "\n".join(lines)
