"""The runtime's layering, enforced: each subpackage imports only from the layers below it.

Read bottom-up (README, "What is where"):

    base        config, errors, paths, lazy    settings and rules every layer shares
    devices     Camera/Stage/Driver, scan plan the hardware boundary
    ml          backends, model folders, tasks inference on frames (devices' image types)
    output      mosaic store, pyramid, TIFF    files on disk
    stitching   registration .. accumulator    tiles -> mosaic (writes through output)
    ipc         messages, ring, channels       what crosses a process boundary
    analysis    tumour, nuclei, slide score    slide analysis on final pixels (models via ml)
    focus       sweep, single shot, surface    per-field focus (models via ml or ipc)
    workers     the four worker processes      glue the layers above into processes
    control     wire protocol, server, client  the socket; knows nothing of workers
    daemon      supervisor, scan job, state    owns processes and the control server
    fleet       batch over many slides (dask)  focus + stitching + output per slide, no daemon
    __main__    the command line               may use anything

Function-level imports count too: a late import is still a dependency.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"

BASE = frozenset({"config", "errors", "paths", "lazy"})
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset({"base"}),
    "devices": frozenset({"base"}),
    "ml": frozenset({"base", "devices"}),  # the image types of the hardware boundary
    "output": frozenset({"base"}),
    "stitching": frozenset({"base", "devices", "output"}),
    "ipc": frozenset({"base", "devices"}),
    # Slide analysis (tumour, nuclei, slide score) on final slide pixels: models via ml, files via output.
    "analysis": frozenset({"base", "devices", "ml", "output"}),
    "focus": frozenset({"base", "devices", "ml", "ipc"}),
    "workers": frozenset({"base", "devices", "ml", "output", "stitching", "ipc", "focus", "analysis"}),
    "control": frozenset({"base"}),
    "daemon": frozenset(
        {"base", "devices", "ml", "output", "stitching", "ipc", "focus", "analysis", "workers", "control"}
    ),
    # A batch runs the scan's components in one process per slide: no workers, no daemon.
    "fleet": frozenset({"base", "devices", "ml", "output", "stitching", "ipc", "focus", "analysis"}),
}
ALLOWED["__main__"] = frozenset(ALLOWED) | {"daemon"}  # the command line may use every layer


def _layer(module: str) -> str:
    """``runtime.stitching.registration`` -> ``stitching``; base modules and the package -> ``base``."""
    parts = module.split(".")
    assert parts[0] == "runtime"
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(RUNTIME.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every runtime module ``path`` imports (absolute or relative, at any depth), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "runtime"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "runtime":
                continue
            if target == "runtime":  # from runtime import paths, errors, ...
                found += [(node.lineno, f"runtime.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in RUNTIME.rglob("*.py") if "builtin" not in p.parts)


def test_every_runtime_module_belongs_to_a_known_layer() -> None:
    unknown = {_layer(_module_name(p)) for p in _sources()} - set(ALLOWED)
    assert not unknown, f"subpackages without a place in the layering: {sorted(unknown)} (add them to ALLOWED)"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(RUNTIME.parent)))
def test_imports_only_from_lower_layers(path: Path) -> None:
    here = _layer(_module_name(path))
    allowed = ALLOWED[here] | {here}
    imports = _imports(path)
    bad = [f"line {line}: {target} ({_layer(target)})" for line, target in imports if _layer(target) not in allowed]
    assert not bad, f"{here} may import only from {sorted(allowed)}; {path.name} imports " + "; ".join(bad)


def test_no_untyped_queues() -> None:
    """Every queue between processes carries one declared message type (``Queue[Any]`` hides which)."""
    offenders = [
        f"{p.relative_to(RUNTIME.parent)}:{i}"
        for p in _sources()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"Queue\[Any\]", line)
    ]
    assert not offenders, f"Queue[Any] in {offenders}"


def test_the_layering_test_can_fail() -> None:
    """The parser sees late, relative and package-root imports (so a violation cannot hide)."""
    fake = RUNTIME / "focus" / "_layering_probe.py"
    source = "def f():\n    from runtime.workers import acquisition\n    from ..daemon import supervisor\n"
    source += "from runtime import paths\n"
    try:
        fake.write_text(source)
        targets = [t for _, t in _imports(fake)]
    finally:
        fake.unlink()
    assert sorted(_layer(t) for t in targets) == ["base", "daemon", "workers"]
    assert {_layer(t) for t in targets} - ALLOWED["focus"] == {"workers", "daemon"}


SUBPACKAGES = sorted(p.parent.name for p in RUNTIME.glob("*/__init__.py"))


def _init_imports(package: str) -> set[str]:
    """The names a subpackage's ``__init__`` imports from runtime modules (eagerly or under ``TYPE_CHECKING``),
    other than the lazy re-export helper itself (``runtime.lazy``)."""
    tree = ast.parse((RUNTIME / package / "__init__.py").read_text(encoding="utf-8"))
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("runtime.")
        and node.module != "runtime.lazy"
        for alias in node.names
    }


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_exports_resolve(package: str) -> None:
    """Every name in a subpackage's ``__all__`` resolves, whether re-exported eagerly or lazily (PEP 562),
    and the ``__init__`` imports exactly those names, so type checkers and IDEs see each one."""
    pkg = importlib.import_module(f"runtime.{package}")
    exported = list(pkg.__all__)
    assert exported, f"runtime.{package} exports nothing"
    assert len(set(exported)) == len(exported), f"duplicates in runtime.{package}.__all__"
    missing = [name for name in exported if not hasattr(pkg, name)]
    assert not missing, f"runtime.{package}.__all__ names that do not resolve: {missing}"
    assert _init_imports(package) == set(exported), f"runtime.{package}: imports and __all__ disagree"
    lazy = getattr(pkg, "_MODULES", None)
    if lazy is not None:
        assert {n for names in lazy.values() for n in names} == set(exported), f"runtime.{package}: _MODULES"


@pytest.mark.parametrize("worker", ["stitcher", "writer"])
def test_stitcher_and_writer_do_not_load_the_inference_stack(worker: str) -> None:
    """A worker process imports its own module, and with it every package ``__init__`` on the way:
    none of them may drag in the inference stack or the other workers."""
    others = [f"runtime.workers.{w}" for w in ("acquisition", "inference", "stitcher", "writer") if w != worker]
    code = (
        "import sys\n"
        f"import runtime.workers.{worker}\n"
        f"forbidden = ('onnxruntime', 'torch', 'tensorrt', *{others!r})\n"
        "print(sorted(m for m in sys.modules if m in forbidden or m.split('.')[0] in forbidden))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"importing runtime.workers.{worker} loaded {proc.stdout.strip()}"
