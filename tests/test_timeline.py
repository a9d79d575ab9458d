"""Run timings (fgclf/timeline.py) and the scripts' exit without module teardown (fgclf.runtime.exit_process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import REPO

from fgclf.timeline import Timeline, _proc_start


def test_phases_are_the_gaps_between_marks_from_the_start():
    timeline = Timeline(from_process_start=False)
    start = timeline.start
    timeline.marks = [("a", start + 1.0), ("b", start + 1.5), ("a", start + 4.0)]
    assert timeline.phases() == {"a": 3.5, "b": 0.5}  # a name marked twice adds up
    out = timeline.as_dict()
    assert out["process_s"] == 4.0 and out["launcher_s"] is None


def test_process_start_is_read_from_the_os():
    """A child process's start from /proc equals the moment it was spawned (to a clock tick)."""
    code = ("import json, sys, time\nsys.path.insert(0, sys.argv[1])\nfrom fgclf.timeline import Timeline\n"
            "print(json.dumps([Timeline().start, time.time()]))")
    before = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    start, now = json.loads(proc.stdout)
    assert before - 0.05 <= start <= now  # spawned after `before`, started before it read the clock
    assert abs(_proc_start() - _proc_start(os.getpid())) < 0.02


def test_exit_process_runs_atexit_joins_threads_flushes_and_keeps_the_code(tmp_path):
    marker, late = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    code = f"""
import atexit, sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from fgclf.runtime import exit_process
atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), open({str(late)!r}, "w").write("done"))).start()
sys.stdout.write("unflushed tail")
exit_process(3)
print("never")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3 and marker.read_text() == "ran"
    assert late.read_text() == "done" and proc.stdout == "unflushed tail"


def test_exit_process_under_a_profiler_exits_normally(tmp_path):
    """python -m cProfile must still get to write its statistics: under a profiler the exit is sys.exit."""
    script = tmp_path / "s.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom fgclf.runtime import exit_process\n"
                      "def work():\n    return sum(range(1000))\nwork()\nexit_process(4)\n")
    out = tmp_path / "prof.out"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), str(script)], capture_output=True, text=True)
    assert out.is_file() and out.stat().st_size > 0, proc.stderr  # (cProfile itself swallows the exit code)


def test_exit_process_does_not_wait_for_idle_pools(tmp_path):
    """Thread and process pools left open (torch.compile leaves one) are told to stop, as at a normal exit."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from fgclf.runtime import exit_process
threads, procs = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
threads.submit(sum, [1, 2]).result(), procs.submit(sum, [1, 2]).result()
exit_process(5)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stderr


def test_a_run_without_deepspeed_does_not_import_it():
    """accelerate's unwrap_model/get_state_dict import DeepSpeed (about 0.2 s and a warning) to test for its
    engine; fgclf's accelerator asks only once deepspeed is loaded, and an engine is still unwrapped then."""
    import pytest

    pytest.importorskip("deepspeed")  # without it there is nothing to import (the test extra installs it)
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from torch import nn
from fgclf.runtime import create_accelerator
accelerator = create_accelerator(log_with=None)
create_accelerator(log_with=None)  # a second accelerator in the process changes nothing
inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
model = accelerator.prepare(inner)
assert accelerator.unwrap_model(model) is inner and set(accelerator.get_state_dict(model)) == set(inner.state_dict())
print("LOADED", "deepspeed" in sys.modules)
from accelerate.utils.other import extract_model_from_parallel
from deepspeed import DeepSpeedEngine
engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # an engine around the model, without its set-up
nn.Module.__init__(engine)
engine.module = inner
print("UNWRAPPED", extract_model_from_parallel(engine) is inner)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tagged = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(("LOADED ", "UNWRAPPED ")))
    assert tagged == {"LOADED": "False", "UNWRAPPED": "True"}, proc.stdout
