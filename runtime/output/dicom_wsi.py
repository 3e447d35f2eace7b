"""DICOM WSI output (VL Whole Slide Microscopy Image IOD, Supplement 145) of the slide's pyramid.

For PACS and the DICOM-based tools (wsidicom, OpenSlide 4's dicom driver,
viewers behind DICOMweb): one folder per slide, one file per pyramid level
(``level-0.dcm`` full resolution, then each 2x smaller), every file a
multi-frame instance of the same series, study and frame of reference, tiled
``TILED_FULL`` (frames in row-major order, no per-frame functional groups),
with the pixel spacing of its level in the shared functional groups.

**The same tiles as the OME-TIFF.** :class:`~runtime.output.ome_tiff.OmeTiffStream`
hands every encoded tile to :meth:`DicomWsiWriter.write_tile` as it appends it
to the TIFF. A JPEG tile of the TIFF is a complete baseline JPEG stream (YCbCr,
its own tables), which is exactly a frame of DICOM's JPEG Baseline transfer
syntax: the bytes are copied, never decoded or encoded again. The TIFF's
lossless codecs (deflate, zstd) have no DICOM counterpart (DICOM has no
per-frame deflate or zstd), so the frames are then native, uncompressed RGB
(the raw tile: ``none``'s tile bytes themselves) as long as level 0 fits the
4 GiB of one Pixel Data element, and beyond that lossless JPEG 2000, encoded on
the TIFF writer's encoder threads (:attr:`DicomWsiWriter.frame_encoder`) at
about 13x the cost of the zstd TIFF itself. OpenSlide and wsidicom read all three.

**Why pydicom and not highdicom or wsidicom for writing.** The file is
streamed: a level's frames arrive while the scan moves down, and nothing but
8 bytes per frame may stay in memory. highdicom's ``VLWholeSlideMicroscopyImage``
takes a level's whole pixel matrix (or all its frames) in memory; wsidicom
writes by pulling frames from a finished source image, and needs Python >= 3.11
plus dicomweb-client, fsspec, marshmallow and Pillow. pydicom (pure Python,
Python >= 3.10, no compiled dependency: nothing stands in the way on a Jetson's
Python, though it was not installed on one here) builds and writes each file's data set here; the encapsulated
Pixel Data that follows it (one item per frame, the offset table filled in at
the end) is a few lines of the standard's byte layout (PS3.5 A.4), as
:mod:`runtime.output.tiff_stream` is for TIFF. wsidicom and OpenSlide read
the result in the tests, and Debian's ``dciodvfy`` validates it.

**Offsets** (of compressed frames; native ones sit at fixed places). A Basic
Offset Table (32-bit offsets) is reserved and filled in when the level is
complete; a level whose frames could pass 4 GiB (at 1.25 raw tiles per frame:
more than 4369 frames of 512 px) gets an Extended Offset Table
(64-bit) instead, as the standard provides for large instances. (Debian's
``dciodvfy`` of 2022 does not know the OV VR of the extended table: such files
read in wsidicom and OpenSlide, but that validator misreads them.)

**Identifiers.** :class:`DicomIdentifiers`: patient name and ID, accession
number, study ID and UID, slide (container) ID, from the ``writer.dicom_*`` config
keys or the export's flags; left empty they stay empty (type 2 attributes:
an anonymous slide), and every UID not given is generated.

Memory: one buffered file per level (256 KiB each) and 8 bytes per frame.
Written under ``OUT.partial`` and renamed when every level is complete.
"""

from __future__ import annotations

import base64
import datetime
import io
import os
import shutil
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import imagecodecs
import numpy as np

from runtime.config import WriterConfig
from runtime.paths import create_exclusive

# pydicom is imported where a DICOM series is made (DicomWsiWriter and the data-set builders it
# calls), not here: the writer worker imports this module for DicomIdentifiers on every scan,
# and importing pydicom cost ~0.35 CPU-s per scan while `writer.dicom` is off (the default).
if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SOP_CLASS_UID", "DicomIdentifiers", "DicomWsiWriter", "level_file_name"]

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"  # native (uncompressed) frames
_NATIVE_LIMIT = 2**32 - 2  # an element's length is 32 bits, 0xFFFFFFFF meaning "undefined"
MANUFACTURER = "wsi-edge-runtime"
OffsetTable = Literal["auto", "basic", "extended"]

# sRGB (IEC 61966-2.1) ICC profile, as littlecms 2 makes it (Pillow: ImageCms.createProfile("sRGB")).
# The IOD requires an ICC profile for colour images; the camera pipeline's output is treated as sRGB,
# as the OME-TIFF's is. Embedded so the runtime needs neither Pillow nor littlecms for 588 bytes.
_SRGB_ICC = base64.b64decode(
    "AAACTGxjbXMEQAAAbW50clJHQiBYWVogB+oACwAaAAMABAAPYWNzcEFQUEwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAPbWAAEA"
    "AAAA0y1sY21zAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAALZGVzYwAA"
    "AQgAAAA2Y3BydAAAAUAAAABMd3RwdAAAAYwAAAAUY2hhZAAAAaAAAAAsclhZWgAAAcwAAAAUYlhZWgAAAeAAAAAUZ1hZWgAAAfQA"
    "AAAUclRSQwAAAggAAAAgZ1RSQwAAAggAAAAgYlRSQwAAAggAAAAgY2hybQAAAigAAAAkbWx1YwAAAAAAAAABAAAADGVuVVMAAAAa"
    "AAAAHABzAFIARwBCACAAYgB1AGkAbAB0AC0AaQBuAABtbHVjAAAAAAAAAAEAAAAMZW5VUwAAADAAAAAcAE4AbwAgAGMAbwBwAHkA"
    "cgBpAGcAaAB0ACwAIAB1AHMAZQAgAGYAcgBlAGUAbAB5WFlaIAAAAAAAAPbWAAEAAAAA0y1zZjMyAAAAAAABDEoAAAXj///zKgAA"
    "B5sAAP2H///7ov///aMAAAPYAADAlFhZWiAAAAAAAABvlAAAOO4AAAOQWFlaIAAAAAAAACSdAAAPgwAAtr5YWVogAAAAAAAAYqUA"
    "ALeQAAAY3nBhcmEAAAAAAAMAAAACZmYAAPKnAAANWQAAE9AAAApbY2hybQAAAAAAAwAAAACj1wAAVHsAAEzNAACZmgAAJmYAAA9c"
)

_RATIO_PLACEHOLDER = "0" * 16
# (0028,2112) Lossy Image Compression Ratio, explicit VR DS, length 16, the placeholder: unique in a header.
_RATIO_ELEMENT = struct.pack("<HH", 0x0028, 0x2112) + b"DS" + struct.pack("<H", 16) + _RATIO_PLACEHOLDER.encode()
_ITEM = 0xE000
_SEQUENCE_DELIMITER = 0xE0DD
_FILE_BUFFER = 256 * 1024


def level_file_name(k: int) -> str:
    """The file of pyramid level ``k`` inside the slide's DICOM folder."""
    return f"level-{k}.dcm"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    from pydicom.dataset import Dataset  # late: see the imports

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@dataclass(frozen=True)
class DicomIdentifiers:
    """The slide's patient, study and slide identifiers; empty: anonymous (UIDs generated).

    Validated where a user gives them: the ``writer.dicom_*`` keys of the typed config
    (:class:`~runtime.config.WriterConfig`), which the export's flags go through too.
    """

    patient_name: str = ""  # DICOM PN, e.g. "Doe^Jane"
    patient_id: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_instance_uid: str = ""  # empty: a new study UID per slide
    container_identifier: str = ""  # the slide's barcode/label ID; empty: the series UID

    @classmethod
    def from_config(cls, w: WriterConfig) -> DicomIdentifiers:
        return cls(
            patient_name=w.dicom_patient_name,
            patient_id=w.dicom_patient_id,
            accession_number=w.dicom_accession_number,
            study_id=w.dicom_study_id,
            study_instance_uid=w.dicom_study_uid,
            container_identifier=w.dicom_slide_id,
        )


class _Level:
    """One level's open file: where its frames start, and each frame's offset and length so far."""

    def __init__(
        self, f: BinaryIO, n_frames: int, extended: bool, table_pos: int, first_frame: int, ratio_pos: int | None
    ) -> None:
        self.f = f
        self.ratio_pos = ratio_pos  # the lossy compression ratio's value, to fill in (None: lossless)
        self.n_frames = n_frames
        self.extended = extended
        self.table_pos = table_pos  # the first byte of the offset table's values
        self.first_frame = first_frame  # file position of the first frame's item tag
        self.offsets = array("Q")
        self.lengths = array("Q")


class DicomWsiWriter:
    """A DICOM WSI series of ``shapes`` (full resolution first) at the folder ``out``, frame by frame.

    ``codec``: the TIFF's tile codec. ``"jpeg"``: :meth:`write_tile` takes the TIFF's JPEG tiles as
    they are, whatever their chroma subsampling. The lossless ones: native (uncompressed
    RGB) frames while level 0 fits one element (4 GiB: about 37000 x 37000 px), else lossless JPEG
    2000; :attr:`frame_encoder` makes a frame of a raw (tile, tile, 3) tile, or is None where the
    TIFF's tile bytes are the frame (``"jpeg"``, and ``"none"`` with native frames).
    Frames of one level must come in row-major order (levels may interleave). :meth:`finish` renames
    ``OUT.partial`` to ``out`` once every level is complete; :meth:`abort` removes it.
    """

    def __init__(
        self,
        out: str | Path,
        shapes: Sequence[tuple[int, int]],
        tile: int,
        pixel_size_um: float,
        *,
        codec: str = "jpeg",
        ids: DicomIdentifiers | None = None,
        name: str = "slide",
        offset_table: OffsetTable = "auto",
    ) -> None:
        if not shapes:
            raise ValueError("a DICOM WSI needs at least one level")
        if not pixel_size_um > 0:
            raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
        self.path = Path(out)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self.tile = tile
        self.codec = codec
        self.jpeg = codec == "jpeg"
        # Lossless: native frames cost nothing but disk (3 bytes a pixel); lossless JPEG 2000, the one
        # compressed lossless syntax OpenSlide 4 also decodes, made the zstd export 12.7x as costly
        # (bench writer, 16384 px: 135 vs 10.7 CPU s), so it is kept for levels too large to be native.
        h0, w0 = self.shapes[0]
        self.native = not self.jpeg and -(-h0 // tile) * -(-w0 // tile) * tile * tile * 3 <= _NATIVE_LIMIT
        # JPEG: the TIFF's YCbCr JPEG. YBR_FULL_422 whatever the subsampling: the only YCbCr value the
        # WSI IOD admits for JPEG (dciodvfy refuses YBR_FULL, and OpenSlide 4 will not open it); readers
        # take the sampling factors from the JPEG stream itself (4:4:4 and 4:1:1 checked in OpenSlide
        # and wsidicom).
        # JPEG 2000 lossless with the reversible colour transform (imagecodecs applies it to RGB): YBR_RCT.
        if self.jpeg:
            self.transfer_syntax = JPEG_BASELINE
            self.photometric = "YBR_FULL_422"
        elif self.native:
            self.transfer_syntax, self.photometric = EXPLICIT_VR_LITTLE_ENDIAN, "RGB"
        else:
            self.transfer_syntax, self.photometric = JPEG2000_LOSSLESS, "YBR_RCT"
        self._levels: list[_Level] = []
        from pydicom.uid import generate_uid  # late: see the imports

        ids = ids or DicomIdentifiers()
        now = datetime.datetime.now()
        series_uid = generate_uid()
        common = _common_dataset(ids, now, series_uid, name, self.shapes[0], pixel_size_um)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        try:
            for k, (h, w) in enumerate(self.shapes):
                self._levels.append(self._open_level(k, h, w, pixel_size_um * 2**k, common, offset_table))
        except BaseException:
            self.abort()
            raise

    @property
    def frame_encoder(self) -> Callable[[np.ndarray], bytes] | None:
        """None: :meth:`write_tile` takes the TIFF's tiles as they are; else what makes a frame of a raw tile."""
        if self.jpeg or (self.native and self.codec == "none"):
            return None
        if self.native:
            return lambda t: t.tobytes()
        codecs: Any = imagecodecs  # the stubs type the codec's keywords loosely
        return lambda t: bytes(codecs.jpeg2k_encode(t, level=0, codecformat="J2K", reversible=True))

    def write_tile(self, k: int, row: int, col: int, data: bytes) -> None:
        """Append frame (row, col) of level ``k``: the next one in row-major order."""
        lvl = self._levels[k]
        index = len(lvl.offsets)
        cols = -(-self.shapes[k][1] // self.tile)
        if index >= lvl.n_frames or (row, col) != divmod(index, cols):
            raise ValueError(
                f"DICOM level {k}: frames must come in row-major order; "
                f"expected {divmod(index, cols)}, got {(row, col)}"
            )
        if self.native:
            if len(data) != self.tile * self.tile * 3:
                raise ValueError(f"DICOM level {k}: a native frame is {self.tile}x{self.tile}x3 bytes, got {len(data)}")
            lvl.offsets.append(0)  # only counted: native frames sit at fixed places
            lvl.f.write(data)
            return
        pad = len(data) & 1  # item values have even length: a trailing zero byte (PS3.5 A.4)
        lvl.offsets.append(lvl.f.tell() - lvl.first_frame)
        lvl.lengths.append(len(data) + pad)
        lvl.f.write(struct.pack("<HHI", 0xFFFE, _ITEM, len(data) + pad))
        lvl.f.write(data)
        if pad:
            lvl.f.write(b"\0")

    def finish(self) -> Path:
        """Close every level (sequence delimiter, offset table) and rename the folder to ``out``."""
        try:
            short = [k for k, lvl in enumerate(self._levels) if len(lvl.offsets) != lvl.n_frames]
            if short:
                raise ValueError(f"DICOM levels {short} are missing frames")
            for k, lvl in enumerate(self._levels):
                if self.native:
                    lvl.f.close()
                    continue
                lvl.f.write(struct.pack("<HHI", 0xFFFE, _SEQUENCE_DELIMITER, 0))
                lvl.f.seek(lvl.table_pos)
                if lvl.extended:
                    offsets = lvl.offsets.tobytes()
                    lvl.f.write(offsets)
                    lvl.f.seek(lvl.table_pos + len(offsets) + 12)  # past the lengths element's 12-byte header
                    lvl.f.write(lvl.lengths.tobytes())
                else:
                    if lvl.offsets[-1] >= 2**32:
                        raise ValueError(
                            f"DICOM level {k}: its frames pass 4 GiB, past 32-bit offsets; use offset_table='extended'"
                        )
                    lvl.f.write(struct.pack(f"<{lvl.n_frames}I", *lvl.offsets))
                if lvl.ratio_pos is not None:
                    # Uncompressed frame bytes over stored frame bytes, as the JPEG tiles were encoded.
                    ratio = lvl.n_frames * self.tile * self.tile * 3 / max(sum(lvl.lengths), 1)
                    lvl.f.seek(lvl.ratio_pos)
                    lvl.f.write(f"{ratio:.2f}".ljust(16).encode())
                lvl.f.close()
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Close the files and remove the partial folder."""
        for lvl in self._levels:
            lvl.f.close()
        self._levels = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _open_level(
        self, k: int, h: int, w: int, spacing_um: float, common: Dataset, offset_table: OffsetTable
    ) -> _Level:
        import pydicom  # late: see the imports
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import UID

        t = self.tile
        n_frames = -(-h // t) * -(-w // t)
        ds = _level_dataset(common, k, h, w, t, n_frames, spacing_um, self.photometric, self.jpeg)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(SOP_CLASS_UID)
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID(self.transfer_syntax)
        ds.file_meta = meta
        extended = offset_table == "extended" or (offset_table == "auto" and n_frames * _frame_bound(t) >= 2**32)
        fd = create_exclusive(self.tmp / level_file_name(k))
        f = os.fdopen(fd, "wb", buffering=_FILE_BUFFER)
        try:
            header = io.BytesIO()  # a few KiB: written whole, then searched for the ratio's place
            pydicom.dcmwrite(header, ds, enforce_file_format=True)
            f.write(header.getbuffer())
            ratio_pos = header.getvalue().index(_RATIO_ELEMENT) + len(_RATIO_ELEMENT) - 16 if self.jpeg else None
            if self.native:
                # Pixel Data of defined length (every frame's bytes, known now), the frames follow as they come.
                f.write(_explicit_header(0x7FE0, 0x0010, b"OB", n_frames * t * t * 3))
                return _Level(f, n_frames, False, 0, f.tell(), None)
            if extended:
                # Extended Offset Table and its Lengths (OV, 8 bytes per frame), filled in by finish();
                # the Basic Offset Table is then empty (PS3.5 A.4).
                f.write(_explicit_header(0x7FE0, 0x0001, b"OV", 8 * n_frames))
                table_pos = f.tell()
                f.write(bytes(8 * n_frames))
                f.write(_explicit_header(0x7FE0, 0x0002, b"OV", 8 * n_frames))
                f.write(bytes(8 * n_frames))
            f.write(_explicit_header(0x7FE0, 0x0010, b"OB", 0xFFFFFFFF))  # Pixel Data, undefined length
            bot = 0 if extended else 4 * n_frames
            f.write(struct.pack("<HHI", 0xFFFE, _ITEM, bot))
            if not extended:
                table_pos = f.tell()
                f.write(bytes(bot))
        except BaseException:
            f.close()
            raise
        return _Level(f, n_frames, extended, table_pos, f.tell(), ratio_pos)


def _frame_bound(tile: int) -> int:
    """Bytes a frame item may take, at most, for choosing 32-bit offsets: 1.25 raw tiles.

    A baseline JPEG tile stays well under its raw size; lossless JPEG 2000 of pure noise measured
    1.10x (imagecodecs 2026.3). Beyond this bound :meth:`DicomWsiWriter.finish` refuses the level.
    """
    return tile * tile * 3 * 5 // 4 + 8


def _explicit_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    """An element header in explicit VR little endian, for the VRs with a 32-bit length (OB, OV)."""
    return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", length)


def _common_dataset(
    ids: DicomIdentifiers,
    now: datetime.datetime,
    series_uid: str,
    name: str,
    shape0: tuple[int, int],
    pixel_size_um: float,
) -> Dataset:
    """The attributes every level shares: patient, study, series, frame of reference, equipment, specimen."""
    import pydicom.datadict  # late: see the imports
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import UID, generate_uid

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: patient names need not be ASCII
    ds.SOPClassUID = UID(SOP_CLASS_UID)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    # Patient (all type 2: present, empty when anonymous).
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study.
    ds.StudyInstanceUID = UID(ids.study_instance_uid or generate_uid())
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ids.study_id
    ds.AccessionNumber = ids.accession_number
    # General Series, Whole Slide Microscopy Series.
    ds.Modality = "SM"
    ds.SeriesInstanceUID = UID(series_uid)
    ds.SeriesNumber = 1
    ds.SeriesDescription = name[:64]
    # Frame of Reference: every level of the slide in one slide coordinate system.
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    # General and Enhanced General Equipment.
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "0.1.0"
    # Acquisition Context (type 2: present, empty).
    ds.AcquisitionContextSequence = DicomSequence([])
    # Specimen: the slide (container) and the one specimen on it, both identified only by UIDs
    # unless the slide's ID was given.
    ds.ContainerIdentifier = ids.container_identifier or series_uid
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier = ds.ContainerIdentifier
    specimen.SpecimenUID = generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenPreparationSequence = DicomSequence([])
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    # Whole Slide Microscopy Image: what does not change between levels.
    h0, w0 = shape0
    ds.ImagedVolumeWidth = w0 * pixel_size_um / 1000  # FL, mm
    ds.ImagedVolumeHeight = h0 * pixel_size_um / 1000
    # Required (type 1C, dciodvfy checks it, and SliceThickness below), but the section's thickness is
    # not known to the scanner: 1 µm stands for one focal plane; no reader tried uses it.
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0.0
    origin.YOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    # The image's rows run along the slide's -Y axis, its columns along -X: the label end on the left,
    # as most scanners (and wsidicom's default) place the slide.
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S.%f")
    ds.AcquisitionDuration = 0.0
    ds.VolumetricProperties = "VOLUME"
    ds.SpecimenLabelInImage = "NO"
    ds.BurnedInAnnotation = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.ContentDate = date
    ds.ContentTime = time
    # Optical Path: one brightfield, full-spectrum path, its colour described by the sRGB profile.
    path = Dataset()
    path.OpticalPathIdentifier = "0"
    path.IlluminationTypeCodeSequence = DicomSequence([_code("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = DicomSequence([_code("414298005", "SCT", "Full Spectrum")])
    path.ICCProfile = _SRGB_ICC
    path.ColorSpace = "SRGB"
    ds.OpticalPathSequence = DicomSequence([path])
    ds.NumberOfOpticalPaths = 1
    # Multi-frame Dimension: tiles indexed by their position in the total pixel matrix.
    ds.DimensionOrganizationType = "TILED_FULL"
    org = Dataset()
    org.DimensionOrganizationUID = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([org])
    index = []
    for label in ("Column", "Row"):
        tag = f"{label}PositionInTotalImagePixelMatrix"
        item = Dataset()
        item.DimensionOrganizationUID = org.DimensionOrganizationUID
        item.DimensionIndexPointer = pydicom.datadict.tag_for_keyword(tag)
        item.FunctionalGroupPointer = pydicom.datadict.tag_for_keyword("PlanePositionSlideSequence")
        item.DimensionDescriptionLabel = f"{label} Position"
        index.append(item)
    ds.DimensionIndexSequence = DicomSequence(index)
    return ds


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DS)."""
    return f"{value:.10g}"[:16]


def _level_dataset(
    common: Dataset,
    k: int,
    h: int,
    w: int,
    tile: int,
    n_frames: int,
    spacing_um: float,
    photometric: str,
    lossy: bool,
) -> Dataset:
    from pydicom.dataset import Dataset  # late: see the imports
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import UID, generate_uid

    ds = Dataset()
    ds.update(common)
    ds.SOPInstanceUID = UID(generate_uid())
    ds.InstanceNumber = k + 1
    # Level 0 is what the scanner made; the lower levels are resampled from it.
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if k == 0 else (["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
    )
    ds.TotalPixelMatrixColumns = w
    ds.TotalPixelMatrixRows = h
    ds.Rows = tile
    ds.Columns = tile
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        # The ratio is known once the level is complete: a placeholder of the longest DS (16 characters),
        # overwritten in place by finish().
        ds.LossyImageCompressionRatio = _RATIO_PLACEHOLDER
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    shared = Dataset()
    measures = Dataset()
    spacing_mm = _ds(spacing_um / 1000)
    measures.PixelSpacing = [spacing_mm, spacing_mm]  # row spacing, column spacing (mm)
    measures.SliceThickness = common.ImagedVolumeDepth
    shared.PixelMeasuresSequence = DicomSequence([measures])
    frame_type = Dataset()
    frame_type.FrameType = ds.ImageType
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    optical = Dataset()
    optical.OpticalPathIdentifier = "0"
    shared.OpticalPathIdentificationSequence = DicomSequence([optical])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    return ds
