"""Run checkpoints: ``checkpoints/last`` (resume) and ``checkpoints/best`` (weights to use).

Layout::

    checkpoints/last/   state/ (accelerate: model, optimizer, scheduler, RNG per process),
                        trainer_state.json, config.json, frozen.json (when frozen parameters are left out)
    checkpoints/best/   model.safetensors + config.json (an export: ``--model.name file:DIR`` loads it;
                        PEFT is merged), adapter_model.safetensors (PEFT runs), trainer_state.json

Each is written under a temporary name, fsynced and renamed into place only when complete, so a
kill (or power loss) at any moment leaves the previous complete checkpoint readable, and a failed
write (disk full, folder not writable) stops the run with that checkpoint untouched.

When part of the model is frozen (PEFT, linear probe, ``partial:N``) ``last/`` holds only the
trainable parameters and the buffers (:meth:`Checkpointer.skip_frozen`): the frozen weights are
rebuilt from the run's base model at resume, and ``frozen.json`` records their checksum so a
resume on other base weights is refused instead of silently mixing two models.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from fgclf.engine import TrainState
from fgclf.errors import UserError
from fgclf.runtime import debug_fault
from fgclf.utils import atomic_write_json, replace_dir

# config.json keys that must match for a checkpoint to be resumed or loaded into this run
_COMPATIBLE_KEYS = ("model_name", "num_classes", "peft", "method")
_PLAIN = {"name": "plain", "options": {}}  # what a checkpoint from before methods existed was trained with
ADAPTER_NAME = "adapter_model.safetensors"
OBJECTS_DIR = "objects"
FROZEN_NAME = "frozen.json"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, folder not writable); the previous one is intact."""


def frozen_checksum(named_params) -> dict:
    """Count, sum and sum of squares (float64) of the given parameters: a cheap identity check."""
    total, s1, s2, names = 0, 0.0, 0.0, 0
    for _, p in sorted(named_params, key=lambda item: item[0]):
        d = p.detach().double()
        total, s1, s2, names = total + d.numel(), s1 + d.sum().item(), s2 + (d * d).sum().item(), names + 1
    return {"tensors": names, "numel": total, "sum": s1, "sum_sq": s2}


def _same_checksum(a: dict, b: dict) -> bool:
    import math

    return (a["tensors"] == b["tensors"] and a["numel"] == b["numel"]
            and all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-6) for k in ("sum", "sum_sq")))


def save_object_states(folder: Path, objects: dict) -> None:
    """Each object's ``state_dict()`` without pickle: all-tensor states as safetensors, others as JSON."""
    import torch
    from safetensors.torch import save_file

    if not objects:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in objects.items():
        state = obj.state_dict()
        if state and all(torch.is_tensor(v) for v in state.values()):
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / f"{name}.safetensors"))
        else:
            atomic_write_json(folder / f"{name}.json", state)


def load_object_states(folder: Path, objects: dict, *, legacy_dir: Optional[Path] = None) -> None:
    """Restore what :func:`save_object_states` wrote. A checkpoint from before it (the state pickled by
    accelerate as ``custom_checkpoint_<i>.pkl`` in ``legacy_dir``) is read with ``weights_only=True``."""
    import torch
    from safetensors.torch import load_file

    for index, (name, obj) in enumerate(objects.items()):
        tensors, plain = folder / f"{name}.safetensors", folder / f"{name}.json"
        legacy = legacy_dir / f"custom_checkpoint_{index}.pkl" if legacy_dir is not None else None
        if tensors.is_file():
            obj.load_state_dict(load_file(str(tensors)))
        elif plain.is_file():
            obj.load_state_dict(json.loads(plain.read_text()))
        elif legacy is not None and legacy.is_file():
            obj.load_state_dict(torch.load(legacy, map_location="cpu", weights_only=True))
        else:
            raise UserError(f"{folder.parent} holds no saved {name} state; it was not written by this run's settings")


class Checkpointer:
    """Writes and reads the ``last`` and ``best`` checkpoints of one run directory.

    Args:
        accelerator: The run's ``Accelerator`` (every process must call ``save_last``).
        run_dir: The run directory.
        meta: ``config.json`` content: ``model_name``, ``num_classes``, ``class_names``,
            ``model_kwargs``, ``peft``, ``data_config``.
    """

    def __init__(self, accelerator, run_dir: str | Path, *, meta: dict) -> None:
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.meta = meta
        self._frozen: Optional[set[str]] = None  # parameter names left out of last/
        self._frozen_sum: Optional[dict] = None
        self._model: Optional[nn.Module] = None
        self.objects: dict = {}  # name -> object with state_dict()/load_state_dict(), saved without pickle

    def track_states(self, **objects) -> None:
        """Save these objects' states in ``last/objects`` (JSON or safetensors, never pickle).

        Used instead of ``accelerator.register_for_checkpointing``, whose loader unpickles with
        ``weights_only=False``.
        """
        self.objects.update(objects)

    def skip_frozen(self, model: nn.Module) -> bool:
        """Leave ``model``'s frozen parameters out of ``last/`` (call once, after ``prepare``).

        Returns False (and changes nothing) when nothing is frozen or the model is sharded by
        DeepSpeed/FSDP, whose engines write their own checkpoints.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                                 DistributedType.MEGATRON_LM):
            return False
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        if not frozen:
            return False
        self._frozen = {n for n, _ in frozen}
        self._frozen_sum = frozen_checksum(frozen)
        self._model = model

        def drop_frozen(models, weights, output_dir) -> None:
            if len(weights) != 1:
                raise RuntimeError(f"skip_frozen expects one prepared model, accelerate saves {len(weights)}")
            weights[0] = {k: v for k, v in weights[0].items() if k not in self._frozen}

        self.accelerator.register_save_state_pre_hook(drop_frozen)
        return True

    @property
    def last(self) -> Path:
        return self.dir / "last"

    @property
    def best(self) -> Path:
        return self.dir / "best"

    def _fresh_tmp(self, name: str) -> Path:
        tmp = self.dir / f".{name}.tmp"
        if self.accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        return tmp

    def _write(self, target: Path, *, every_process: Callable[[Path], None] = lambda tmp: None,
               main_process: Callable[[Path], None] = lambda tmp: None) -> None:
        """Write the checkpoint folder ``target`` (collective): ``every_process(tmp)`` on all
        processes, then ``main_process(tmp)`` and the rename into place on the main one.

        ``tmp`` is ``.<name>.tmp`` beside ``target``; :func:`fgclf.utils.replace_dir` fsyncs it
        and swaps it in. An OSError on any process (disk full, folder not writable) removes
        ``tmp`` and raises :class:`CheckpointWriteError` on every process, naming the error and
        the previous checkpoint, which is left as it was.
        """
        tmp = target.with_name(f".{target.name}.tmp")

        def fresh(tmp: Path) -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        main = self.accelerator.is_main_process
        for step, here in ((fresh, main), (every_process, True), (main_process, main)):
            error = None
            if here:
                try:
                    step(tmp)
                    if step is main_process:
                        replace_dir(tmp, target)
                except OSError as err:
                    error = err
            self._agree(error, tmp, target)  # also the barrier between the steps

    def _agree(self, error: Optional[OSError], tmp: Path, target: Path) -> None:
        """Raise CheckpointWriteError on every process when any had ``error`` (collective)."""
        message = None
        if error is not None:
            what = error.strerror or str(error)
            message = f"{what} ({error.filename})" if error.filename else what
        if self.accelerator.num_processes > 1:
            import torch
            import torch.distributed as dist

            failed = torch.tensor(int(error is not None), device=self.accelerator.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if not failed.item():
                return
            messages = [None] * self.accelerator.num_processes
            dist.all_gather_object(messages, message)
            message = "; ".join(f"process {i}: {m}" for i, m in enumerate(messages) if m is not None)
        if message is None:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = next((p for p in (target, target.with_name(target.name + ".old")) if p.is_dir()), None)
        kept = (f"the previous checkpoint at {previous} is intact" if previous is not None
                else "there was no previous checkpoint")
        raise CheckpointWriteError(f"could not write checkpoint {target}: {message}; {kept}")

    def save_last(self, state: TrainState) -> None:
        """Save everything ``--resume`` needs (collective: call on every process)."""
        def write_state(tmp: Path) -> None:
            self.accelerator.save_state(str(tmp / "state"), safe_serialization=True)
            debug_fault("save_last", tmp)  # test hook: a kill or a full disk in the middle of the write

        def write_meta(tmp: Path) -> None:
            atomic_write_json(tmp / "trainer_state.json", state.to_dict())
            atomic_write_json(tmp / "config.json", self.meta)
            if self._frozen is not None:
                atomic_write_json(tmp / FROZEN_NAME, {"parameters": len(self._frozen), "checksum": self._frozen_sum})
            save_object_states(tmp / OBJECTS_DIR, self.objects)

        self._write(self.last, every_process=write_state, main_process=write_meta)

    def save_best(self, model: nn.Module, state: TrainState) -> None:
        """Export the model as ``file:``-loadable weights (collective: call on every process).

        A PEFT model is exported merged (a plain timm model) and its adapter weights are kept
        beside it, so the run can reload exactly the trained adapter for the test evaluation.
        """
        from safetensors.torch import save_file

        from fgclf.models import save_pretrained

        state_dict = self.accelerator.get_state_dict(model)  # gathers under DeepSpeed/FSDP

        def export(tmp: Path) -> None:
            unwrapped = self.accelerator.unwrap_model(model)
            meta = self.meta
            save_pretrained(unwrapped, tmp, model_name=meta["model_name"], num_classes=meta["num_classes"],
                            class_names=meta["class_names"], model_kwargs=meta["model_kwargs"],
                            state_dict=state_dict, extra={k: v for k, v in meta.items() if k not in
                                                          ("model_name", "num_classes", "class_names", "model_kwargs")})
            if meta.get("peft"):
                from peft import get_peft_model_state_dict

                adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unwrapped).items()}
                save_file(adapter, str(tmp / ADAPTER_NAME))
            atomic_write_json(tmp / "trainer_state.json", state.to_dict())

        self._write(self.best, main_process=export)

    def check_compatible(self, ckpt_dir: Path) -> None:
        """Raise a UserError when ``ckpt_dir`` was made for another model or class count."""
        cfg_path = Path(ckpt_dir) / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"not an fgclf checkpoint (no config.json): {ckpt_dir}")
        theirs = json.loads(cfg_path.read_text())
        for key in _COMPATIBLE_KEYS:
            if key == "method":
                mine, other = self.meta.get(key) or _PLAIN, theirs.get(key) or _PLAIN
            else:
                mine, other = self.meta.get(key), theirs.get(key)
            if other != mine:
                what = "classifier size" if key == "num_classes" else key
                raise UserError(f"cannot resume from {ckpt_dir}: {what} is {other!r} there but {mine!r} in this run")

    def load_last(self, ckpt_dir: Optional[str | Path] = None) -> TrainState:
        """Restore model, optimizer, scheduler and RNG from ``ckpt_dir`` (default ``last``)."""
        ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else self.last
        if not (ckpt_dir / "trainer_state.json").is_file():
            raise UserError(f"no resumable checkpoint at {ckpt_dir} (missing trainer_state.json)")
        self.check_compatible(ckpt_dir)
        if (ckpt_dir / FROZEN_NAME).is_file():
            self._check_frozen(ckpt_dir)
            self.accelerator.load_state(str(ckpt_dir / "state"), strict=False)  # frozen keys: kept from the base
        else:
            self.accelerator.load_state(str(ckpt_dir / "state"))
        load_object_states(ckpt_dir / OBJECTS_DIR, self.objects, legacy_dir=ckpt_dir / "state")
        return TrainState(**json.loads((ckpt_dir / "trainer_state.json").read_text()))

    def _check_frozen(self, ckpt_dir: Path) -> None:
        """A trainable-only checkpoint loads only onto the same frozen base, with every other key."""
        from safetensors import safe_open

        saved = json.loads((ckpt_dir / FROZEN_NAME).read_text())
        if self._frozen is None or not _same_checksum(saved["checksum"], self._frozen_sum):
            raise UserError(f"cannot resume from {ckpt_dir}: it holds only the trained parameters, and this run's "
                            "frozen base weights differ from those it was trained on (other pretrained weights, "
                            "--model.weights file or strategy)")
        path = ckpt_dir / "state" / "model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        expected = set(self._model.state_dict()) - self._frozen
        if keys != expected:
            missing = sorted(expected - keys)[:3]
            raise UserError(f"cannot resume from {ckpt_dir}: its model state does not match this model "
                            f"(missing e.g. {missing}, unexpected e.g. {sorted(keys - expected)[:3]})")

    def load_best_weights(self, model: nn.Module) -> bool:
        """Load the ``best`` weights into the trained model (collective); False when there are none.

        ``model`` is the prepared one. A plain or DDP model takes the file with ``load_state_dict``;
        a sharded one cannot (a ZeRO-3 parameter is an empty placeholder on every process, an FSDP
        one a shard), so :func:`_load_full_state` puts the full weights through the sharding.
        """
        from safetensors.torch import load_file

        self.accelerator.wait_for_everyone()
        peft = bool(self.meta.get("peft"))
        path = self.best / (ADAPTER_NAME if peft else "model.safetensors")
        if not path.is_file():
            return False
        _load_full_state(self.accelerator, model, load_file(str(path), device="cpu"), peft=peft)
        return True


def _load_full_state(accelerator, model: nn.Module, state: dict, *, peft: bool) -> None:
    """Load a full (unsharded) state dict, or a PEFT adapter's, into the prepared ``model`` (collective).

    ZeRO-3: inside ``deepspeed.zero.GatheredParameters`` every process holds the whole parameters,
    loads the same file, and process 0's values are partitioned again on exit (the whole model is
    gathered at once, as the ``best`` export already does). FSDP (1 or 2): torch's
    ``set_model_state_dict`` with ``full_state_dict`` sends process 0's tensors into every shard.
    """
    from contextlib import nullcontext

    from accelerate.utils import DistributedType

    target = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if peft:  # the adapter file uses PEFT's names: let PEFT say which model keys they are
            state = _peft_keys_for_load(target, state)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not peft)
        set_model_state_dict(model, state if accelerator.is_main_process else {}, options=options)
        return
    gather = nullcontext()
    params = list(target.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned parameters
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gather:
        if peft:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(target, state)
        else:
            target.load_state_dict(state, strict=True)


def _peft_keys_for_load(peft_model: nn.Module, adapter: dict) -> dict:
    """The adapter state under the model's own parameter names, as ``set_peft_model_state_dict``
    renames it (captured from its ``load_state_dict`` call instead of loading)."""
    from peft import set_peft_model_state_dict
    from torch.nn.modules.module import _IncompatibleKeys

    captured: dict = {}

    def capture(state_dict, strict=True, assign=False):
        captured.update(state_dict)
        return _IncompatibleKeys([], [])

    peft_model.load_state_dict = capture  # an instance attribute: shadows the method for this one call
    try:
        set_peft_model_state_dict(peft_model, adapter)
    finally:
        del peft_model.load_state_dict
    return captured


def load_adapter_model(ckpt_dir: str | Path, *, base_weights: bool = True) -> nn.Module:
    """Rebuild a PEFT run's model from its base weights plus the saved adapter (``best/``, or an
    adapter export of ``scripts/export.py --format adapter``).

    The base comes from the recorded ``model_name`` / ``base`` settings (the same pretrained or
    local weights the run started from); the adapter file holds the adapter and the new head.
    ``--model.name file:DIR`` loads the merged export instead; both give the same outputs.
    ``base_weights=False`` builds the same structure on randomly initialised base weights (for
    writing the adapter's own config without downloading the base).
    """
    from safetensors.torch import load_file

    from fgclf.models import apply_peft, create_model

    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {ckpt_dir / 'config.json'} ({err})") from None
    peft_cfg, base = meta.get("peft"), meta.get("base") or {}
    if not peft_cfg or not (ckpt_dir / ADAPTER_NAME).is_file():
        raise UserError(f"{ckpt_dir} holds no PEFT adapter; load it with --model.name file:{ckpt_dir}")
    if base_weights and not base.get("pretrained", False) and not base.get("weights"):
        raise UserError(f"{ckpt_dir}'s adapter was trained on randomly initialised base weights, which cannot be "
                        f"rebuilt; load the merged export with --model.name file:{ckpt_dir}")
    model = create_model(base.get("model_name", meta["model_name"]), num_classes=meta["num_classes"],
                         pretrained=base_weights and base.get("pretrained", False),
                         weights=base.get("weights") if base_weights else None, **meta.get("model_kwargs", {}))
    method = meta.get("method") or {}
    if method.get("name", "plain") != "plain":  # the method's model around the base, as the run built it
        from fgclf.methods import create_method

        model = create_method(method["name"], **method.get("options", {})).build(model, meta["num_classes"])
    model = apply_peft(model, method=peft_cfg["method"], r=peft_cfg["r"], alpha=peft_cfg["alpha"],
                       dropout=peft_cfg["dropout"], target_modules=peft_cfg["target_modules"])
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(ckpt_dir / ADAPTER_NAME), device="cpu"))
    return model.eval()
