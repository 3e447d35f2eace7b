"""The daemon's workers start with OpenCV's thread pool told not to spin and numpy's BLAS on one thread
(runtime.daemon.process)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# A parent that sets the daemon's environment (SETUP) and spawns one child, which reports what it saw
# (CHILD: the body of child(q), ending in q.put(...)); spawn re-imports the parent's main module, so
# the script is a file, not -c.
SPAWN_ONE = """
import multiprocessing as mp, os
from runtime.daemon.process import {names}

def child(q):
{child}

if __name__ == "__main__":
    {setup}()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    print(q.get(timeout=30))
    p.join()
"""


def _spawned_child_saw(tmp_path: Path, variables: str, setup: str, child: str, env: dict[str, str]) -> Any:
    script = tmp_path / f"spawn_{setup}.py"
    script.write_text(SPAWN_ONE.format(names=f"{variables}, {setup}", setup=setup, child=child))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    return ast.literal_eval(out.stdout.strip())  # what the child put on the queue


OPENCV_CHILD = """
    import cv2  # reads the variables when it loads
    q.put({k: os.environ.get(k) for k in QUIET_OPENCV_POOL})
"""


def test_spawned_workers_inherit_the_quiet_pool_and_an_operators_setting_wins(tmp_path: Path) -> None:
    env = {"PATH": "", "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN": "500"}
    got = _spawned_child_saw(tmp_path, "QUIET_OPENCV_POOL", "quiet_opencv_pool", OPENCV_CHILD, env)
    assert got == {"OPENCV_THREAD_POOL_ACTIVE_WAIT_WORKER": "0", "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN": "500"}


BLAS_CHILD = """
    import numpy as np  # OpenBLAS reads the variable when numpy loads it
    a = np.ones((400, 400))
    a @ a  # large enough that a pool would start its threads
    q.put({"env": {k: os.environ.get(k) for k in QUIET_BLAS_POOL}, "threads": len(os.listdir("/proc/self/task"))})
"""


def test_workers_run_numpys_blas_on_one_thread_unless_the_operator_says_otherwise(tmp_path: Path) -> None:
    got = [
        _spawned_child_saw(tmp_path, "QUIET_BLAS_POOL", "quiet_blas_pool", BLAS_CHILD, env)
        for env in ({"PATH": ""}, {"PATH": "", "OPENBLAS_NUM_THREADS": "2"})
    ]
    assert got[0]["env"] == {"OPENBLAS_NUM_THREADS": "1"}
    assert got[1]["env"] == {"OPENBLAS_NUM_THREADS": "2"}
    if Path("/proc/self/task").is_dir() and (os.cpu_count() or 1) >= 2:  # Linux: the pool's threads, or none
        assert got[0]["threads"] < got[1]["threads"]
