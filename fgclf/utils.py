"""Small helpers shared by the package: cache location, atomic writes, environment facts."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the fgclf cache.

    The cache is ``$FGCLF_CACHE`` when set, else ``~/.cache/fgclf``. Generated datasets and
    converted weights live there, never in git.
    """
    root = Path(os.environ.get("FGCLF_CACHE", Path.home() / ".cache" / "fgclf")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename, fsync
    the folder: a kill or power loss leaves either the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that the renames and new entries in it survive a power loss (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms whose folders cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (files written by other libraries, before a rename)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a completely written ``tmp_dir`` to ``final_dir``, replacing an old one.

    The new folder's files are fsynced first, then the old folder is renamed aside to
    ``<final>.old`` and deleted only after the new one is in place (and the renames are fsynced),
    so at every moment, even after a kill or a power loss, either the old or the new complete
    folder exists under a known name (:func:`fgclf.checkpoint_paths.find_last` looks at both).
    A ``.old`` left by a kill between the two renames is the only complete copy while
    ``final_dir`` is missing, so it is kept until the new folder has replaced it.
    """
    from fgclf.runtime import debug_fault

    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    fsync_tree(tmp_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        if old.exists():  # final_dir is complete: a leftover .old is stale
            shutil.rmtree(old)
        os.replace(final_dir, old)
        debug_fault("replace_dir")  # test hook: a kill between the two renames
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def package_versions(names: tuple[str, ...] = ("fgclf", "torch", "torchvision", "timm", "accelerate",
                                               "torchmetrics", "peft", "numpy", "scikit-learn")) -> dict:
    """Installed versions of the packages that decide a run's numbers (missing ones are omitted)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    import platform

    out["python"] = platform.python_version()
    return out


def peak_memory_mb(device: Any = None) -> float:
    """Peak memory of this process so far, MiB: CUDA peak allocated when ``device`` is a CUDA
    device (None: when CUDA is available), else peak RSS.

    Peak RSS includes the interpreter and libraries (several hundred MiB for torch), so compare
    it between runs of the same script rather than reading it as the model's footprint.
    """
    import torch

    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")
