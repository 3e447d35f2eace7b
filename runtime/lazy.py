"""Lazy re-exports for a subpackage's ``__init__`` (PEP 562), in one place.

A package whose modules are heavy or run as separate processes (``workers``, ``daemon``, ``ml``,
``output``, ``control``) lists ``module -> names`` and gets a module ``__getattr__`` that imports a
name's module on first access, and a ``__dir__`` that lists ``__all__``::

    if TYPE_CHECKING:
        from runtime.ml.tasks import load_models  # what mypy and IDEs read
    else:
        _MODULES = {"tasks": ("load_models",)}
        __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())

Keeping the pair under ``else:`` hides ``__getattr__`` from mypy, so a misspelt import is
still an error rather than a silent ``Any``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, tuple[str, ...]], namespace: dict[str, Any]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose ``namespace`` (its ``globals()``) holds
    ``__all__``; a resolved name is stored in the namespace, so later lookups skip this."""

    def __getattr__(name: str) -> object:
        for module, names in modules.items():
            if name in names:
                value = getattr(importlib.import_module(f"{package}.{module}"), name)
                namespace[name] = value
                return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", ())})

    return __getattr__, __dir__
