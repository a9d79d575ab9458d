"""What every script does around its job: accelerator set-up, run directory, main-process work,
clean shutdown and one-line user errors; and the test-only fault hooks (FGCLF_DEBUG_*)."""
from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from fgclf.errors import UserError


def create_accelerator(*, grad_accum_steps: int = 1, mixed_precision: Optional[str] = None,
                       log_with: Optional[str] = "tensorboard", backend: Optional[str] = None,
                       clip_grad_norm: Optional[float] = None, compile: bool = False):
    """An ``Accelerator`` whose data loaders split the *global* batch across processes.

    ``split_batches=True`` makes ``batch_size`` mean the same thing on 1 or 8 processes, and
    the seedable sampler gives epoch ``e`` the same shuffle whether or not the run was resumed
    (seeded from ``data_seed``: call :func:`seed_shared` before ``prepare``).
    Mixed precision comes from the accelerate config unless ``mixed_precision`` overrides it.

    Under DeepSpeed the engine clips and accumulates by its own config: ``clip_grad_norm`` (None:
    no clipping) is written into it, since accelerate would otherwise fill in 1.0 and silently clip
    a run that asked for none, and a ``grad_accum_steps`` other than the DeepSpeed config's is
    refused. On a machine without GPU DeepSpeed gets the gloo backend (VERIFIED.md).
    ``compile`` turns on accelerate's dynamo plugin (``torch.compile``, inductor) for prepared models.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        import torch

        if not torch.cuda.is_available():  # accelerate then starts N processes that each think they are alone
            raise UserError("FSDP needs GPUs (without one accelerate runs each process as a separate single-process "
                            "run); on CPU use accelerate_configs/deepspeed_zero3.yaml, which shards the same way")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            raise UserError("ACCELERATE_USE_CPU=1 silently turns a DeepSpeed config into plain multi-process CPU "
                            "training; unset it (without a GPU DeepSpeed runs on the CPU by itself)")
        import torch

        if backend is None and not torch.cuda.is_available():
            backend = "gloo"  # DeepSpeed on CPU: without it accelerate sees one process (VERIFIED.md)
    handlers = [InitProcessGroupKwargs(backend=backend)] if backend else []
    _deepspeed_check_when_loaded()
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        log_with=log_with,
        project_dir="runs",  # placeholder: scripts call set_run_dir before init_trackers
        kwargs_handlers=handlers,
        **({"dynamo_backend": "inductor"} if compile else {}),
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds_config = plugin.deepspeed_config
        ds_config["gradient_clipping"] = float(clip_grad_norm or 0.0)
        ds_accum = ds_config.get("gradient_accumulation_steps", 1)
        if ds_accum != "auto" and int(ds_accum) != grad_accum_steps:
            raise UserError(f"train.grad_accum_steps is {grad_accum_steps} but the DeepSpeed config says "
                            f"gradient_accumulation_steps: {ds_accum}; make them equal")
    return accelerator


def _deepspeed_check_when_loaded() -> None:
    """accelerate's ``extract_model_from_parallel`` (behind ``unwrap_model`` and ``get_state_dict``)
    imports DeepSpeed whenever it is installed, to test ``isinstance(model, DeepSpeedEngine)``: about 0.2 s
    and a "Setting accelerator to CPU" warning in every run that does not use it. A DeepSpeed engine
    exists only once ``deepspeed`` has been imported, so that module asks the question only then (the
    answer is the same; accelerate's other DeepSpeed checks are untouched). For the whole process, once.
    An accelerate without that name is left as it is (tests/test_timeline.py then fails)."""
    from accelerate.utils import other

    if not hasattr(other, "is_deepspeed_available") or getattr(other.is_deepspeed_available, "fgclf_when_loaded",
                                                                False):
        return
    installed = other.is_deepspeed_available

    def loaded_and_installed() -> bool:
        return "deepspeed" in sys.modules and installed()

    loaded_and_installed.fgclf_when_loaded = True  # type: ignore[attr-defined]
    other.is_deepspeed_available = loaded_and_installed


def seed_shared(accelerator, seed: int) -> None:
    """Seed every RNG with ``seed`` on every process, and the train sampler's shuffle too.

    Call before building the model (every process must start from the same weights: a pipeline
    builds the whole model on each process) and before ``prepare`` (accelerate's seedable sampler
    reads ``data_seed``: every process walks the same global order, for any process count).
    """
    from accelerate.utils import set_seed

    accelerator.dataloader_config.data_seed = int(seed)
    set_seed(int(seed))


def seed_per_process(accelerator, seed: int) -> None:
    """Seed process ``r``'s RNGs with ``seed + r`` (timm's rule) once the model and loaders exist.

    What the training processes draw themselves (dropout and drop-path masks, mixup/cutmix) then
    differs between processes instead of repeating the same masks on every shard; augmentation
    has its own per-sample seeds (:class:`fgclf.data.PerSampleSeeds`). A resume restores each
    process's saved RNG state over this.
    """
    from accelerate.utils import set_seed

    set_seed(int(seed) + accelerator.process_index)


def set_run_dir(accelerator, run_dir: Path) -> None:
    """Point accelerate's project and tracker (TensorBoard) folders at the run directory."""
    accelerator.project_configuration.project_dir = str(run_dir)
    accelerator.project_configuration.logging_dir = str(run_dir)


def broadcast_from_main(accelerator, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only and hand its result (or its error) to every process.

    Without this an error on the main process would leave the others waiting forever at the
    next collective call. A UserError is raised as such everywhere; any other exception keeps
    its traceback on the main process and becomes a RuntimeError on the others.
    """
    result, error, exc = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as err:
            error = ("user", str(err))
        except Exception as err:  # noqa: BLE001 - re-raised below on every process
            error, exc = ("bug", f"{type(err).__name__}: {err}"), err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error], from_process=0)
    if error is not None:
        if error[0] == "user":
            raise UserError(error[1])
        if exc is not None:
            raise exc
        raise RuntimeError(f"the main process failed: {error[1]}")
    return result


def default_run_name(*parts: str) -> str:
    """``<part>_<part>_<YYYYmmdd-HHMMSS>`` with unsafe characters replaced."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = [re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-") for p in parts if p]
    return "_".join([*safe, stamp])


def prepare_run_dir(output_dir: Optional[str], name: Optional[str], *, default_name: str,
                    resuming: bool, create: bool = False) -> Path:
    """Choose the run directory and check it (main process); ``create`` also makes it.

    A directory that already holds a run is never overwritten: continuing it needs
    ``--resume``. Scripts check first and create only once their inputs have been validated,
    so a refused run leaves nothing behind.
    """
    path = Path(output_dir) if output_dir else Path("runs") / (name or default_name)
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} exists and is a file")
    holds_run = (path / "config.yaml").exists() or (path / "checkpoints").exists()
    if holds_run and not resuming:
        raise UserError(f"run directory {path} already holds a run; add --resume last to continue it, "
                        "or choose another --train.output_dir")
    if resuming and not holds_run:
        raise UserError(f"nothing to resume in {path} (no checkpoints there)")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise UserError(f"run directory {path} is not writable")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_resume(resume: Optional[str], output_dir: Optional[str]) -> tuple[Optional[str], Optional[Path]]:
    """(run directory, checkpoint dir) for ``--resume`` = ``last`` | a run dir | a checkpoint dir."""
    from fgclf.checkpoint_paths import find_last

    if resume is None:
        return output_dir, None
    if resume == "last":
        if not output_dir:
            raise UserError("--resume last needs --train.output_dir (the run directory to continue)")
        return output_dir, find_last(output_dir) or Path(output_dir) / "checkpoints/last"
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume: no such checkpoint or run directory: {resume}")
    if find_last(path) is not None:
        return output_dir or str(path), find_last(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return output_dir or (str(run_dir) if run_dir else None), path


# settings that may differ between a run and its --resume (they do not change the result)
RESUME_FREE = frozenset({"resume", "train.output_dir", "train.progress", "train.name", "data.num_workers",
                         "data.verify_images", "data.cache_dir", "train.max_nonfinite_steps"})


def check_resume_config(cfg: Any, run_dir: Path, *, free: frozenset[str] = RESUME_FREE) -> int:
    """Refuse a --resume whose settings differ from the run's config.yaml; return the run's seed.

    ``free`` lists the dotted settings that may change (output folder, progress bars, ...).
    """
    from fgclf.config import load_config, to_dict

    saved = load_config(type(cfg), run_dir / "config.yaml")

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "kwargs" else {f"{prefix}{k}": v})
        return out

    now, before = flat(to_dict(cfg)), flat(to_dict(saved))
    if now.get("train.seed") == "random":
        now["train.seed"] = before.get("train.seed")
    changed = sorted(k for k in set(now) | set(before) if k not in free and now.get(k) != before.get(k))
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise UserError(f"--resume with other settings than the run in {run_dir} ({detail}); "
                        "resume with the original command, or start a new run")
    return int(before["train.seed"])


def command_line() -> str:
    """The command as typed (launcher variables included) for ``config.yaml``."""
    launcher = {k: v for k, v in os.environ.items() if k in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION",
                                                              "ACCELERATE_USE_CPU")}
    prefix = " ".join(f"{k}={v}" for k, v in sorted(launcher.items()))
    return (prefix + " " if prefix else "") + shlex.join([sys.executable, *sys.argv])


def shutdown(accelerator) -> None:
    """Release prepared objects and end trackers on every process (avoids gloo exit aborts)."""
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def kill_loader_workers_at_exit() -> None:
    """At exit, SIGKILL this process's daemonic children (DataLoader workers) before multiprocessing joins them.

    Loader workers ignore SIGTERM (:func:`ignore_stop_signals`), which is how multiprocessing's own exit
    hook ends daemonic children: a run that ends by an uncaught error while persistent workers are
    alive would wait for them forever. Registered after multiprocessing's hook, so it runs before it.
    """
    import atexit
    import multiprocessing
    import signal

    def kill() -> None:
        if hasattr(signal, "SIGCHLD"):  # torch's handler would raise "worker killed" in the middle of this
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        children = [c for c in multiprocessing.active_children() if c.daemon and c.pid is not None]
        for child in children:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except OSError:
                pass
        for child in children:
            try:
                child.join(timeout=5)
            except Exception:  # noqa: BLE001 -- exiting: nothing else to do about a child
                pass
    if not getattr(kill_loader_workers_at_exit, "registered", False):
        atexit.register(kill)
        kill_loader_workers_at_exit.registered = True


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the training process.

    Ctrl-C, or a SIGTERM sent to the whole process group (job schedulers), would otherwise kill
    the workers and turn the graceful stop of ``fgclf.engine.fit`` into a "DataLoader worker
    killed" crash. Workers still end with their loader, or soon after the training process dies.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR2"):  # SLURM's time-limit warning (fgclf.engine.STOP_SIGNALS)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that take plain flags: a bad flag is a one-line UserError (exit 2
    through :func:`script_main`), like every fgclf script; the description is shown as written."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def error(self, message: str):
        raise UserError(message)


def split_data_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(data_args, others)``: the ``--data.*`` / ``--config`` flags (with their values) of ``argv``,
    for a :class:`fgclf.config.DataConfig` parser, and the rest, for the script's own parser."""
    data_args, own = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(("--data.", "--config")):
            take = 1 if "=" in token else 2
            data_args += argv[i:i + take]
            i += take
        else:
            own.append(token)
            i += 1
    return data_args, own


def exit_process(code: Optional[int]) -> NoReturn:
    """End a script's process with ``code`` as a normal exit would, less Python's module teardown.

    Other threads are joined and the ``atexit`` handlers run (process groups, loggers, loader
    workers), standard output and error are flushed; then the process ends without freeing every
    module one by one, which takes seconds once torch and a training run's imports are loaded
    (``bench/fixed_cost.py``: the ``exit`` row is what is left). Files the scripts write are
    closed before they return. Under a profiler or tracer (``python -m cProfile``, a debugger, coverage
    without its atexit hook) the process exits normally so the tool can write what it collected.
    """
    import atexit
    import threading

    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)

    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter runs first at exit: tells thread
    if shutdown is not None:  # and process pools (concurrent.futures, torch.compile's) to stop, joins threads
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to say
            pass
    os._exit(0 if code is None else int(code))


def script_main(fn: Callable[[Optional[list[str]]], int]) -> Callable[[Optional[list[str]]], int]:
    """Decorator for script entry points: a UserError becomes ``error: ...`` on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[list[str]] = None) -> int:
        try:
            return fn(argv)
        except UserError as err:
            rank = os.environ.get("RANK", "0")
            if rank == "0":
                print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper


# ---------------------------------------------------------------- test-only fault injection
# The fault tests (tests/scripts/test_faults.py) make runs fail on purpose at chosen points through
# these environment variables. They are read here and nowhere else; never set them for real runs.
#
#   FGCLF_DEBUG_KILL_AT_STEP=N     SIGKILL right after update N (after its step checkpoint, if any)
#   FGCLF_DEBUG_SIGNAL_AT_STEP=N   send this process SIGTERM right after update N (``N:INT``: SIGINT; ``N:USR2``: SLURM's time-limit warning;
#                                  ``N:TERM:group``: to its whole process group, like Ctrl-C or a scheduler)
#   FGCLF_DEBUG_RAISE_AT_STEP=N    raise RuntimeError right after update N
#   FGCLF_DEBUG_NAN_AT_STEP=N      the training loss is nan from the N-th training batch on
#   FGCLF_DEBUG_KILL_IN_SAVE=N     SIGKILL inside the N-th write of ``last`` by this process, once the
#                                  state files are in the temporary folder and before it is complete
#                                  (``N:swap``: between the two renames of fgclf.utils.replace_dir)
#   FGCLF_DEBUG_FAIL_SAVE=N        at the same point the N-th write fails: OSError ENOSPC (``N:EACCES``...)
#   FGCLF_DEBUG_RANK=R             only process R (its RANK) applies the variables above (default: all)
#   FGCLF_DEBUG_AUG_LOG=DIR        each train sample loaded appends "index rng-digest" to
#                                  DIR/aug_r<RANK>_w<worker>.txt (the draws its augmentation starts from)

_debug_saves = 0  # writes of `last` by this process (FGCLF_DEBUG_KILL_IN_SAVE / _FAIL_SAVE)
_debug_swap_armed = False


def _debug_env(name: str) -> Optional[tuple[int, str]]:
    """``(N, option)`` of ``FGCLF_DEBUG_<name>=N[:option]`` when set and meant for this process."""
    value = os.environ.get(f"FGCLF_DEBUG_{name}")
    only = os.environ.get("FGCLF_DEBUG_RANK")
    if not value or (only is not None and only != os.environ.get("RANK", "0")):
        return None
    n, _, option = value.partition(":")
    return int(n), option


def debug_callbacks() -> tuple:
    """Update callbacks for ``fit`` from the KILL/SIGNAL/RAISE_AT_STEP hooks (none in real runs)."""
    import signal

    def kill(option: str, step: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def send(option: str, step: int) -> None:
        name, _, to = option.upper().partition(":")
        signum = {"INT": signal.SIGINT, "SIGINT": signal.SIGINT, "USR2": signal.SIGUSR2,
                  "SIGUSR2": signal.SIGUSR2}.get(name, signal.SIGTERM)
        if to != "GROUP":
            os.kill(os.getpid(), signum)
            return
        child = os.fork()  # sent from another process, as a shell or a scheduler sends it
        if child == 0:
            os.killpg(os.getpgrp(), signum)
            os._exit(0)
        os.waitpid(child, 0)
        time.sleep(1.0)  # as during the rest of a real update: the other processes of the group react meanwhile

    def fail(option: str, step: int) -> None:
        raise RuntimeError(f"FGCLF_DEBUG_RAISE_AT_STEP: failure injected on process {os.environ.get('RANK', '0')} "
                           f"after update {step}")

    callbacks = []
    for name, action in (("KILL_AT_STEP", kill), ("SIGNAL_AT_STEP", send), ("RAISE_AT_STEP", fail)):
        hook = _debug_env(name)
        if hook is not None:
            callbacks.append(lambda st, n=hook[0], option=hook[1], action=action:
                             action(option, st.global_step) if st.global_step == n else None)
    return tuple(callbacks)


def debug_loss(loss_fn: Callable) -> Callable:
    """``loss_fn``, or with FGCLF_DEBUG_NAN_AT_STEP=N a wrapper whose N-th and later results are nan."""
    nan = _debug_env("NAN_AT_STEP")
    if not nan:
        return loss_fn
    calls = 0

    def nan_from_n(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if calls >= nan[0] else loss
    return nan_from_n


def debug_fault(point: str, path: Optional[Path] = None) -> None:
    """Fault point ``save_last`` (inside a write of ``last`` into ``path``) or ``replace_dir``
    (between its two renames)."""
    global _debug_saves, _debug_swap_armed
    import signal

    if point == "replace_dir":
        if _debug_swap_armed:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    _debug_saves += 1
    kill, fail = _debug_env("KILL_IN_SAVE"), _debug_env("FAIL_SAVE")
    if kill and kill[0] == _debug_saves:
        if kill[1] == "swap":
            _debug_swap_armed = True
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    if fail and fail[0] == _debug_saves:
        import errno

        code = getattr(errno, fail[1] or "ENOSPC")
        raise OSError(code, os.strerror(code), f"{path} (FGCLF_DEBUG_FAIL_SAVE)")


class _AugLog:
    """FGCLF_DEBUG_AUG_LOG: note the torch CPU RNG state each sample's transform starts from."""

    def __init__(self, dataset, folder: str) -> None:
        self.dataset, self.folder = dataset, folder

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import hashlib

        import torch

        info = torch.utils.data.get_worker_info()
        digest = hashlib.sha1(torch.random.default_generator.get_state().numpy().tobytes()).hexdigest()[:16]
        name = f"aug_r{os.environ.get('RANK', '0')}_w{info.id if info else 'main'}.txt"
        with open(Path(self.folder) / name, "a") as f:
            f.write(f"{index} {digest}\n")
        return self.dataset[index]

    def __getattr__(self, name: str):
        if name in ("dataset", "folder"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def debug_aug_log(dataset):
    """``dataset``, or with FGCLF_DEBUG_AUG_LOG=DIR one that logs each sample's RNG state (tests)."""
    folder = os.environ.get("FGCLF_DEBUG_AUG_LOG")
    return _AugLog(dataset, folder) if folder else dataset
