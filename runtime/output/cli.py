"""``python -m runtime export MOSAIC_ZARR OUT.ome.tif``: write a mosaic as a pyramidal OME-TIFF.

``--ome-zarr OUT.ome.zarr`` adds the NGFF copy, ``--dicom DIR`` a DICOM WSI series (from the same
tiles; the identifiers from ``--patient-id`` etc. or the config's ``writer.dicom_*``, else anonymous).

Works on an interrupted scan too: its lower levels are first brought up to
date with the rows that were scanned (``MosaicStore.finish(partial=True)``,
which updates the working mosaic in place; a resumed scan still continues
correctly), and the unscanned area is exported as the fill colour (white).

Defaults come from the ``[writer]`` section of the configuration (``args.config``
if the caller's parser has one, else the built-in defaults); flags override.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.config import ConfigError, load_config, with_overrides
from runtime.output.dicom_wsi import DicomIdentifiers
from runtime.output.mosaic_store import MosaicError, MosaicStore
from runtime.output.ome_tiff import write_ome_tiff

__all__ = ["add_export_arguments", "add_export_parser", "main", "run_export"]

_SUBSAMPLING = {"2x2": (2, 2), "2x1": (2, 1), "4x1": (4, 1), "1x1": (1, 1)}
_DICOM_FLAGS = (
    ("patient-name", "dicom_patient_name", "patient's name, e.g. Doe^Jane"),
    ("patient-id", "dicom_patient_id", "patient ID"),
    ("accession-number", "dicom_accession_number", "accession number"),
    ("study-id", "dicom_study_id", "study ID"),
    ("study-uid", "dicom_study_uid", "study instance UID (default: a new one)"),
    ("slide-id", "dicom_slide_id", "the slide's (container) ID, e.g. its barcode"),
)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mosaic", type=Path, metavar="MOSAIC_ZARR", help="the scan's Zarr mosaic directory")
    p.add_argument("out", type=Path, metavar="OUT.ome.tif", help="output file (written as OUT.partial, then renamed)")
    # None: take the value from the configuration's [writer] section.
    p.add_argument("--compression", choices=["jpeg", "deflate", "zstd", "none"], default=None)
    p.add_argument("--quality", type=int, default=None, help="JPEG quality 1-100")
    p.add_argument(
        "--subsampling",
        choices=sorted(_SUBSAMPLING),
        default=None,
        help="JPEG chroma subsampling (default: the config's, 2x2 like Aperio; 1x1 keeps full colour resolution)",
    )
    p.add_argument("--tile", type=int, default=None, help="tile edge in px (default: the mosaic's chunk)")
    p.add_argument("--max-workers", type=int, default=None, help="tile read+compress threads")
    p.add_argument("--buffer-mib", type=int, default=None, help="encoded tiles in flight (MiB)")
    p.add_argument("--ome-zarr", type=Path, default=None, metavar="OUT.ome.zarr", help="also write OME-Zarr (NGFF 0.4)")
    p.add_argument(
        "--dicom",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write DICOM WSI (Supplement 145) into the new folder DIR, a file per level, from the same tiles "
        "(JPEG: the very bytes); for PACS and wsidicom",
    )
    # The DICOM identifiers; each overrides the config's writer.dicom_* key and is validated as that key.
    for flag, key, what in _DICOM_FLAGS:
        p.add_argument(f"--{flag}", dest=key, default=None, help=f"DICOM: {what} (default: the config's, empty)")
    p.add_argument(
        "--openslide-levels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also chain the lower levels as top-level IFDs so OpenSlide sees them (default: the config's, on); "
        "--no-openslide-levels writes the strict OME-TIFF layout",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="write a Zarr mosaic (complete or interrupted) as a pyramidal OME-TIFF",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_export_arguments(p)
    return p


class _Progress:
    """``export: NN%`` on stderr, rewritten in place (only on a terminal: logs get the summary)."""

    def __init__(self) -> None:
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct > self._last:
            self._last = pct
            end = "\n" if done == total else ""
            print(f"\rexport: {pct:3d}% ({done}/{total} tiles)", end=end, file=sys.stderr, flush=True)


def run_export(args: argparse.Namespace) -> int:
    """Run the export described by ``args`` (from :func:`add_export_parser`); 0 on success."""
    try:
        cfg = load_config(getattr(args, "config", None))
        ids = {key: getattr(args, key) for _, key, _ in _DICOM_FLAGS if getattr(args, key, None) is not None}
        w = with_overrides(cfg, {"writer": ids}).writer if ids else cfg.writer
    except ConfigError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    out: Path = args.out
    for path in (out, args.dicom):
        if path is not None and path.exists() and not args.force:
            print(f"export: {path} exists (use --force to replace it)", file=sys.stderr)
            return 1
    try:
        mosaic = MosaicStore.open(args.mosaic)
    except (MosaicError, OSError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    if not mosaic.complete:
        h = mosaic.shape[0]
        print(
            f"export: {args.mosaic} is an interrupted scan ({mosaic.rows_written} of {h} rows); "
            "the unscanned area is exported as white",
            file=sys.stderr,
        )
        if not mosaic.pyramid_current:
            mosaic.finish(partial=True)
    t0 = time.perf_counter()
    try:
        summary = write_ome_tiff(
            mosaic,
            out,
            tile=args.tile or mosaic.chunk,
            compression=args.compression or w.compression,
            jpeg_quality=args.quality if args.quality is not None else w.jpeg_quality,
            subsampling=_SUBSAMPLING[args.subsampling or w.jpeg_subsampling],
            max_workers=args.max_workers or w.max_workers,
            buffer_mib=args.buffer_mib or w.buffer_mib,
            progress=None if args.quiet or not sys.stderr.isatty() else _Progress(),
            ngff_out=args.ome_zarr,
            openslide_levels=w.openslide_levels if args.openslide_levels is None else args.openslide_levels,
            dicom_out=args.dicom,
            dicom_ids=DicomIdentifiers.from_config(w),
        )
    except (ValueError, OSError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 1
    levels = ", ".join(f"{w_}x{h_}" for h_, w_ in summary.levels)
    print(
        f"{summary.path}: {summary.bytes / 2**20:.1f} MiB, {len(summary.levels)} levels ({levels}), "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if args.dicom is not None:
        print(f"{args.dicom}: DICOM WSI, {len(summary.levels)} files")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m runtime.output.cli MOSAIC_ZARR OUT.ome.tif [options]``."""
    p = argparse.ArgumentParser(prog="python -m runtime export", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, help="TOML configuration ([writer] section)")
    add_export_arguments(p)
    return run_export(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
