"""Files on disk: the working Zarr mosaic and its pyramid, and the pyramidal OME-TIFF made from it.

Modules:

* ``mosaic_store``: ``MosaicStore``, the working mosaic, a Zarr v3 group of level 0 and its 2x
  pyramid, written in full-width bands (``FILL``, ``MosaicError``);
* ``chunk_files``: whole-chunk file I/O beside Zarr, for ``MosaicStore`` only (not re-exported);
* ``pyramid``: ``PyramidBuilder``, the streaming 2x area-averaging pyramid (``downsample2x``,
  ``level_shapes``);
* ``tiff_stream``: ``TiffStreamWriter``, a BigTIFF writer taking tiles of any page in any order
  (``TiffPage``);
* ``ome_tiff``: ``OmeTiffStream``, the pyramidal OME-TIFF streamed while the mosaic grows, and
  ``write_ome_tiff`` from a finished one (``partial_path``, and the pieces ``bench`` reuses);
  its lower levels are SubIFDs and, by default, top-level IFDs too, so OpenSlide reads them;
* ``ome_zarr``: ``NgffWriter``, the OME-NGFF copy written beside the OME-TIFF;
* ``dicom_wsi``: ``DicomWsiWriter``, the DICOM WSI series (a file per level) written from the
  OME-TIFF's tiles (``DicomIdentifiers``);
* ``cli``: ``python -m runtime export`` (``add_export_parser``, ``run_export``).

May import: the base modules only.

Re-exports are lazy (PEP 562 ``__getattr__`` imports a name's module on its first access; type
checkers and IDEs read the imports under ``TYPE_CHECKING``): the stitcher worker needs only
``mosaic_store``, and eager re-exports would load the TIFF and NGFF writers (tifffile, numcodecs)
into it; and ``cli`` also runs as ``python -m runtime.output.cli``, which an eager package import
would load twice (runpy's RuntimeWarning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.output.cli import add_export_parser, run_export
    from runtime.output.dicom_wsi import DicomIdentifiers, DicomWsiWriter
    from runtime.output.mosaic_store import FILL, MosaicError, MosaicStore
    from runtime.output.ome_tiff import (
        Compression,
        OmeTiffStream,
        OmeTiffSummary,
        Progress,
        check_options,
        pad_tile,
        partial_path,
        pyramid_pages,
        tile_encoder,
        write_ome_tiff,
    )
    from runtime.output.ome_zarr import NgffWriter
    from runtime.output.pyramid import PyramidBuilder, downsample2x, level_shapes
    from runtime.output.tiff_stream import COMPRESSION_NONE, TiffPage, TiffStreamWriter
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "cli": ("add_export_parser", "run_export"),
        "dicom_wsi": ("DicomIdentifiers", "DicomWsiWriter"),
        "mosaic_store": ("FILL", "MosaicError", "MosaicStore"),
        "ome_tiff": (
            "Compression",
            "OmeTiffStream",
            "OmeTiffSummary",
            "Progress",
            "check_options",
            "pad_tile",
            "partial_path",
            "pyramid_pages",
            "tile_encoder",
            "write_ome_tiff",
        ),
        "ome_zarr": ("NgffWriter",),
        "pyramid": ("PyramidBuilder", "downsample2x", "level_shapes"),
        "tiff_stream": ("COMPRESSION_NONE", "TiffPage", "TiffStreamWriter"),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())


__all__ = [
    "COMPRESSION_NONE",
    "FILL",
    "Compression",
    "DicomIdentifiers",
    "DicomWsiWriter",
    "MosaicError",
    "MosaicStore",
    "NgffWriter",
    "OmeTiffStream",
    "OmeTiffSummary",
    "Progress",
    "PyramidBuilder",
    "TiffPage",
    "TiffStreamWriter",
    "add_export_parser",
    "check_options",
    "downsample2x",
    "level_shapes",
    "pad_tile",
    "partial_path",
    "pyramid_pages",
    "run_export",
    "tile_encoder",
    "write_ome_tiff",
]
