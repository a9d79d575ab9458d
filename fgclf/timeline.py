"""Where a run's fixed cost goes: wall-clock marks from the process start, written as ``timings.json``.

    timeline = Timeline()          # at the top of a script (its process start is read from the OS)
    timeline.mark("config")        # the end of each phase
    ...
    timeline.write(run_dir / "timings.json")

Each phase is the time from the previous mark to its own; the first, ``imports``, starts when the
process started (``/proc/self/stat`` on Linux; elsewhere when this module was imported). Under
``accelerate launch`` the launcher is this process's parent: ``launcher`` is the time from the
launcher's start to this process's start (its imports and set-up), recorded separately. What
happens after the last mark (freeing the process group, interpreter exit) is measured from
outside, by ``bench/fixed_cost.py`` (its ``exit`` row).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

_IMPORTED = time.time()


def _proc_start(pid: int | str = "self") -> Optional[float]:
    """Wall-clock start of a process from /proc (Linux, to a clock tick), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime, in clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _launcher_start() -> Optional[float]:
    """Start of the parent process when it is accelerate's launcher (or torchrun), else None."""
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "accelerate" not in cmdline and "torchrun" not in cmdline and "torch.distributed.run" not in cmdline:
        return None
    return _proc_start(os.getppid())


class Timeline:
    """Phase marks of one process (see the module docstring)."""

    def __init__(self, from_process_start: bool = True) -> None:
        """``from_process_start`` False: the first phase starts now (a second run in one process)."""
        self.start = (_proc_start() or _IMPORTED) if from_process_start else time.time()
        launcher = _launcher_start() if from_process_start else None
        self.launcher_s = max(0.0, self.start - launcher) if launcher is not None else None
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def phases(self) -> dict[str, float]:
        """Seconds per phase, in order (a name marked twice adds up)."""
        out: dict[str, float] = {}
        before = self.start
        for name, at in self.marks:
            out[name] = out.get(name, 0.0) + max(0.0, at - before)
            before = at
        return out

    def as_dict(self) -> dict:
        phases = self.phases()
        return {"launcher_s": self.launcher_s, "phases_s": {k: round(v, 4) for k, v in phases.items()},
                "process_s": round(sum(phases.values()), 4), "process_start": self.start}

    def write(self, path: str | Path) -> None:
        from fgclf.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")


__all__ = ["Timeline"]
