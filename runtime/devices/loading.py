"""Opening a driver named in the configuration (``module:callable``).

The runtime never imports a driver package statically: the scanner's own
SDK wrapper and ``hw_sim``'s replay driver are both reached the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

from runtime.devices.protocols import Camera, Driver, DriverError, Stage


def open_driver(factory: str, options: dict[str, Any]) -> Driver:
    """Import ``module:callable``, call it with ``options``, check the result is a Driver."""
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DriverError(f"driver.factory {factory!r}: cannot import {module_name!r}: {err}") from None
    make = getattr(module, attr, None)
    if not callable(make):
        raise DriverError(f"driver.factory {factory!r}: {module_name} has no callable {attr!r}")
    try:
        driver = make(**options)
    except TypeError as err:
        raise DriverError(f"driver.options do not fit {factory}: {err}") from None
    if not isinstance(driver, Driver) or not isinstance(driver.camera, Camera) or not isinstance(driver.stage, Stage):
        raise DriverError(f"driver.factory {factory!r} did not return a Driver with a Camera and a Stage")
    return driver
