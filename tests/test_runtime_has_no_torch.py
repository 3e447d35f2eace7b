"""The runtime must work on a device without torch: importing every runtime module must not pull it in."""

import pkgutil
import subprocess
import sys

import runtime


def test_runtime_modules_do_not_import_torch() -> None:
    # Every module of every subpackage (the subpackages' __init__ files import lazily), but not
    # the command line and not the driver conformance suite (it imports pytest, for tests only).
    skip = {"runtime.__main__", "runtime.devices.testing"}
    modules = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.") if m.name not in skip]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import hw_sim.replay, hw_sim.replay_job\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(modules) > 50
