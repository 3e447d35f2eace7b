"""Synthesise a recording: scan a synthetic slide the way a real scanner would.

For every field of a serpentine plan the simulated scanner commands the stage
to the field centre, lands a few µm off (stage error), and records a z-stack
around a *coarse* focus estimate (a focus map is never exact, so the true focus
is not at the centre plane). Each plane is the slide's transmittance at the
actual position, imaged through the optics at that plane's defocus, then
exposed by the camera with noise. The truth (actual positions, true focus z,
the slide spec) is stored alongside, so the runtime's stitching and focus can be
scored against it.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.ndimage as ndi
from tqdm import tqdm

from hw_sim.content import make_slide
from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import SlideSpec, SyntheticSlide
from runtime.devices.protocols import ScanArea
from runtime.devices.recording import FORMAT, RecordingMeta, RecordingWriter, Timing
from runtime.devices.scan_plan import GridPlan, serpentine_plan

# The scanned area's top-left corner on the stage (µm). Deliberately not (0, 0), and x != y,
# so that code which drops the origin or swaps axes fails visibly.
AREA_ORIGIN_UM = (1000.0, 750.0)


# Objectives, as (spherical aberration in RMS waves, axial colour: best-focus z of R, G, B in µm).
# "training": inside the range the committed models were trained on (export/datasets.py draws
# 0.04..0.12 waves, red behind and blue in front); "flipped": the same with the opposite sign (the
# image at +z is then the training objective's image at -z); "apochromat": near aberration-free;
# "strong": well beyond the training range.
OBJECTIVES: dict[str, tuple[float, tuple[float, float, float]]] = {
    "training": (0.08, (0.15, 0.0, -0.2)),
    "flipped": (-0.08, (-0.15, 0.0, 0.2)),
    "apochromat": (0.005, (0.02, 0.0, -0.02)),
    "strong": (0.25, (0.5, 0.0, -0.6)),
}


def objective_params(name: str) -> dict[str, object]:
    """SynthParams keywords of an objective preset (``OBJECTIVES``)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; one of {', '.join(OBJECTIVES)}")
    sph, chrom = OBJECTIVES[name]
    return {"spherical_waves": sph, "chromatic_shift_um": chrom, "objective": name}


@dataclass(frozen=True)
class SynthParams:
    """What to synthesise. ``coarse_focus_error_um``: half-range of the uniform error of the
    stack centre (the coarse focus estimate) around the true focus."""

    fields_x: int = 4
    fields_y: int = 3
    seed: int = 0
    tile: int = 512
    pixel_size_um: float = 0.25
    overlap: float = 0.10
    z_planes: int = 13
    z_step_um: float = 0.5
    stage_error_um: float = 2.0
    coarse_focus_error_um: float = 1.0
    # The objective's residual aberrations (OpticsParams) and artifacts on the slide: held-out
    # benchmark recordings use values the models were never trained on.
    spherical_waves: float = 0.08
    chromatic_shift_um: tuple[float, float, float] = (0.15, 0.0, -0.2)
    # The objective's name in the recording's optics metadata (a preset of OBJECTIVES or "custom").
    objective: str = "custom"
    artifacts: int = 0
    # Imperfections a stitcher must survive (defaults: none). camera_rotation_deg: the camera is
    # turned against the stage axes (a camera pixel offset (u, v) from the frame centre sees the slide
    # at R(angle) (u, v) * pixel_size, x right, y down). stage_scale_error: the stage travels
    # (1 + s) times every commanded distance (measured from the scanned area's centre). tissue_extent:
    # tissue only lies in this fraction of the area's width and height (top-left); the rest is glass.
    camera_rotation_deg: float = 0.0
    stage_scale_error: float = 0.0
    tissue_extent: float = 1.0
    # What the tissue looks like (hw_sim.content): "synthetic" H&E, or content the models never
    # trained on ("ihc": real colon tissue, "brick"/"gravel"/"grass": textures, "file:PATH") at
    # content_px_um µm per image pixel (0: the content's default).
    content: str = "synthetic"
    content_px_um: float = 0.0
    # Which part of a content image (hw_sim.slide.CONTENT_REGIONS: "" all, "left"/"right"/"top"/"bottom" half).
    content_region: str = ""
    # Tumour lesions and benign crowded mimics on the slide (hw_sim.lesions; SlideSpec checks them).
    lesions: int = 0
    mimics: int = 0
    vesicular_max: float = 0.0  # how vesicular a lesion's nuclei may be (SlideSpec.vesicular_max)

    def __post_init__(self) -> None:
        if self.fields_x < 1 or self.fields_y < 1:
            raise ValueError(f"need at least 1 x 1 fields, got {self.fields_x} x {self.fields_y}")
        if self.tile < 16:
            raise ValueError(f"tile must be >= 16 px, got {self.tile}")
        if self.pixel_size_um <= 0 or self.z_step_um <= 0 or self.z_planes < 1:
            raise ValueError("pixel_size_um and z_step_um must be positive and z_planes >= 1")
        if self.stage_error_um < 0 or self.coarse_focus_error_um < 0:
            raise ValueError("stage_error_um and coarse_focus_error_um must be >= 0")
        if not abs(self.camera_rotation_deg) <= 45 or not abs(self.stage_scale_error) < 0.5:
            raise ValueError("camera_rotation_deg must be within +-45 and stage_scale_error within +-0.5")
        if not 0 < self.tissue_extent <= 1:
            raise ValueError(f"tissue_extent must be in (0, 1], got {self.tissue_extent}")


def grid_for(params: SynthParams) -> GridPlan:
    """The serpentine plan over an area that exactly covers fields_x x fields_y fields."""
    field = params.tile * params.pixel_size_um
    step = field * (1.0 - params.overlap)
    width = field + (params.fields_x - 1) * step
    height = field + (params.fields_y - 1) * step
    for shrink in (0.0, 1e-6, 1e-3):
        # An exact cover can round to one field too many in the planner's ceil(); a hair less cannot.
        area = ScanArea(AREA_ORIGIN_UM[0], AREA_ORIGIN_UM[1], width - shrink, height - shrink)
        plan = serpentine_plan(area, field, field, params.overlap)
        if (plan.cols, plan.rows) == (params.fields_x, params.fields_y):
            return plan
    raise ValueError(f"cannot lay out {params.fields_x} x {params.fields_y} fields (planner disagrees)")


def _field_transmittance(
    slide: SyntheticSlide, cx_um: float, cy_um: float, size: int, px: float, rotation_deg: float
) -> npt.NDArray[np.float32]:
    """The (size, size) transmittance a camera centred on (cx, cy) sees, turned by ``rotation_deg``."""
    if rotation_deg == 0.0:
        return slide.transmittance(cx_um - size * px / 2, cy_um - size * px / 2, size, size, px)
    th = math.radians(rotation_deg)
    cos, sin = math.cos(th), math.sin(th)
    # Render an axis-aligned square that contains the turned field, then resample it (the slide
    # model renders axis-aligned pixel grids only) with a cubic spline: OpenCV's warpAffine
    # quantises coordinates to 1/32 px and its cubic kernel misplaces content by up to ~0.05 px,
    # a distortion a stitcher would then be blamed for.
    big = math.ceil(size * (abs(cos) + abs(sin))) + 8
    src = slide.transmittance(cx_um - big * px / 2, cy_um - big * px / 2, big, big, px)
    cs, cd = (big - 1) / 2, (size - 1) / 2
    matrix = np.array([[cos, sin], [-sin, cos]])  # (row, col) of the output -> of the source
    offset = np.array([cs, cs]) - matrix @ np.array([cd, cd])
    out = np.empty((size, size, 3), np.float32)
    for c in range(3):
        out[..., c] = ndi.affine_transform(src[..., c], matrix, offset, output_shape=(size, size), order=3)
    return np.clip(out, 0.0, 1.0)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--force) to replace it")
    # Only ever delete something that is a recording: --force on a wrong path must not wipe it.
    marker = out / "zarr.json"
    if out.is_dir() and marker.is_file() and f'"{FORMAT}"' in marker.read_text(errors="replace"):
        shutil.rmtree(out)
    elif out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    else:
        raise FileExistsError(f"{out} exists and is not a recording; refusing to overwrite it")


def slide_spec(params: SynthParams) -> SlideSpec:
    """The slide a recording of ``params`` images (its origin at the scanned area's top-left)."""
    area = grid_for(params).area
    return SlideSpec(
        seed=params.seed,
        origin_x_um=area.x_um,
        origin_y_um=area.y_um,
        width_um=area.width_um * params.tissue_extent,
        height_um=area.height_um * params.tissue_extent,
        artifacts=params.artifacts,
        content=params.content,
        content_px_um=params.content_px_um,
        content_region=params.content_region,
        lesions=params.lesions,
        mimics=params.mimics,
        vesicular_max=params.vesicular_max,
    )


def synthesize(
    out: Path, params: SynthParams, overwrite: bool = False, progress: bool = False, compress: bool = True
) -> Path:
    """Write a synthetic recording to ``out`` (a folder) and return its path. ``compress``: the
    frames as zstd, else raw (larger; replayed without decoding: see ``RecordingWriter``).

    Written under a temporary name and renamed when complete, so a folder named
    ``out`` is always a whole recording.
    """
    out = Path(out)
    _prepare_out(out, overwrite)
    plan = grid_for(params)
    px, tile = params.pixel_size_um, params.tile
    area = plan.area
    slide = make_slide(slide_spec(params))
    half_stack = (params.z_planes - 1) / 2 * params.z_step_um
    optics_params = OpticsParams(
        spherical_waves=params.spherical_waves,
        chromatic_shift_um=params.chromatic_shift_um,
        objective=params.objective,
        max_defocus_um=max(6.0, half_stack + params.coarse_focus_error_um + 1.0),
    )
    camera = CameraParams()
    optics = Optics(optics_params, px, (tile, tile), camera)
    m = optics.margin_px
    n = len(plan.fields)
    meta = RecordingMeta(
        pixel_size_um=px,
        tile_height=tile,
        tile_width=tile,
        n_fields=n,
        n_z=params.z_planes,
        rows=plan.rows,
        cols=plan.cols,
        overlap=params.overlap,
        area=area,
        field_width_um=plan.field_width_um,
        field_height_um=plan.field_height_um,
        optics=optics_params.to_dict(),
        camera=camera.to_dict(),
        timing=Timing(),
        slide=slide.spec.to_dict(),
    )
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = RecordingWriter(tmp, meta, with_truth=True, compress=compress)
    rng = np.random.default_rng([params.seed, 0x57A6E])
    centre_x, centre_y = area.x_um + area.width_um / 2, area.y_um + area.height_um / 2
    offsets = np.arange(params.z_planes) - (params.z_planes - 1) / 2
    try:
        with tqdm(total=n * params.z_planes, unit="frame", desc="synth", disable=not progress) as bar:
            for f in plan.fields:
                err = np.clip(rng.normal(0.0, 1.0, 2), -3.0, 3.0) * params.stage_error_um
                ax = f.x_um + float(err[0]) + params.stage_scale_error * (f.x_um - centre_x)
                ay = f.y_um + float(err[1]) + params.stage_scale_error * (f.y_um - centre_y)
                focus = slide.focus_z_um(ax, ay)
                # The coarse focus map was measured near the commanded position, with an error.
                coarse = (
                    slide.focus_z_um(f.x_um, f.y_um)
                    + float(rng.uniform(-1.0, 1.0)) * params.coarse_focus_error_um
                )
                z = coarse + offsets * params.z_step_um
                # Render once at the ACTUAL position (what the camera really sees), with the PSF margin.
                obj = optics.prepare(_field_transmittance(slide, ax, ay, tile + 2 * m, px, params.camera_rotation_deg))
                noise = np.random.default_rng([params.seed, f.index, 0xCA3])
                for k in range(params.z_planes):
                    # One defocus per frame, at the field centre: the focal surface varies by only
                    # ~0.1-0.3 µm (less than half a depth of field) across a field.
                    frame = optics.camera_capture(optics.image(obj, float(z[k]) - focus), noise)
                    writer.write_plane(f.index, k, frame)
                    bar.update(1)
                writer.write_positions(f.index, z, (f.x_um, f.y_um), (f.row, f.col), (ax, ay), focus)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
