"""The daemon's configuration: one typed place, loaded from one TOML file.

Every key has a documented default (``python -m runtime config --defaults``
prints them as TOML). An invalid value raises :class:`ConfigError` naming the
key and the reason, e.g. ``scan.overlap: Input should be less than 0.5``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControlConfig(_Section):
    """ZeroMQ endpoints. Defaults bind locally only (ipc); remote binds need CURVE keys."""

    command_endpoint: str = Field("ipc://{runtime_dir}/control.sock", description="ROUTER socket for requests")
    event_endpoint: str = Field("ipc://{runtime_dir}/events.sock", description="PUB socket for events")
    # CURVE (runtime/control/curve.py): with both set, TCP sockets authenticate and encrypt and
    # may bind beyond loopback. `python -m runtime keys DIR --name server` makes a key pair.
    curve_secret_key: str = Field("", description="the server's NAME.key_secret file (empty: no CURVE)")
    curve_authorized_keys: str = Field("", description="folder of authorised clients' public NAME.key files")

    @model_validator(mode="after")
    def _curve_keys_together(self) -> ControlConfig:
        if bool(self.curve_secret_key) != bool(self.curve_authorized_keys):
            raise ValueError("curve_secret_key and curve_authorized_keys must be given together (or neither)")
        return self

    @field_validator("command_endpoint", "event_endpoint")
    @classmethod
    def _supported_transport(cls, value: str) -> str:
        # ipc (local, file permissions) and tcp (loopback only until CURVE keys exist) are
        # what the control server knows how to secure; anything else is refused here, by name,
        # rather than failing obscurely at bind time.
        transport = value.split("://", 1)[0] if "://" in value else ""
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"unsupported transport {transport or value!r}; use ipc://PATH or tcp://127.0.0.1:PORT")
        return value


class DriverConfig(_Section):
    """Which camera/stage driver the acquisition worker opens: ``module:callable`` returning a Driver."""

    factory: str = Field("hw_sim.replay:open_replay_driver", pattern=r"^[\w.]+:\w+$")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")


class ScanConfig(_Section):
    overlap: float = Field(0.10, ge=0.0, lt=0.5, description="overlap between neighbouring fields (fraction)")
    ring_slots: int = Field(8, ge=2, le=256, description="shared-memory tile slots between workers")
    max_fields: int = Field(100_000, ge=1, le=10_000_000, description="refuse a scan whose plan has more fields")


class FocusConfig(_Section):
    """Focus strategy: single-shot deep-learning autofocus, or the contrast sweep (baseline, fallback)."""

    strategy: Literal["contrast_sweep", "single_shot"] = Field(
        "contrast_sweep", description="contrast_sweep (N captures per field) or single_shot (model, ~1 capture)"
    )
    tolerance_um: float = Field(
        0.25, gt=0.0, le=5.0, description="single_shot: accept a frame whose estimated defocus is within this"
    )
    max_moves: int = Field(3, ge=0, le=10, description="single_shot: at most this many corrective z moves per field")
    sweep_half_range_um: float = Field(3.0, gt=0.0, le=50.0, description="sweep +- this around the predicted z")
    sweep_steps: int = Field(9, ge=3, le=101, description="captures per sweep")
    metric: Literal["normalized_variance", "brenner", "tenengrad"] = "normalized_variance"
    start_z_um: float = Field(0.0, description="z of the first field's sweep centre")
    near_focus: Literal["adaptive", "every_field", "off"] = Field(
        "adaptive",
        description="single_shot: check the model near focus against the frames' sharpness "
        "(runtime.focus.near_focus): adaptive (until trusted, then now and then), every_field, or off",
    )
    near_focus_verify_first: int = Field(
        2, ge=1, le=20, description="single_shot adaptive: checks in a row that must pass before the model is trusted"
    )
    near_focus_verify_every: int = Field(
        8, ge=1, le=1000, description="single_shot adaptive: once trusted, one field in this many is checked (doubling)"
    )
    near_focus_trusted_mae_um: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="single_shot adaptive: a calibrated model whose model.json records at most this near-focus "
        "MAE on the instrument's own held-out fields is trusted from the first field (0, the default since stop 29: "
        "never; the scan's own first checks decide. 0.15 trusted the --tta 4 flipped / simulator folder, MAE 0.092 "
        "µm, which then kept a field 0.44 µm off: bench calibration cells 90.9% within, 100% with 0)",
    )
    near_focus_trusted_at_start: bool = Field(
        False, description="single_shot adaptive: trust the model from the first field (set for a calibrated model)"
    )
    near_focus_model_error_um: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="single_shot adaptive: the near-focus error a calibrated model's model.json records on the "
        "instrument's own held-out fields -- the 95th percentile of |error| (near_focus_abs_error_q95_um), or the "
        "MAE for a folder calibrated before stop 29 (set from the folder; 0: none recorded, an uncalibrated model). "
        "Such a model keeps a field's first frame unchecked only when its reading plus this error is within "
        "tolerance_um, and its checks keep a frame within 0.15 µm of the fitted sharpness peak",
    )


class ModelsConfig(_Section):
    """Scan-path models (model folders: model.onnx + model.json) and the inference backend."""

    autofocus_dir: str = Field("builtin", description="autofocus model folder, or 'builtin': the committed one")
    classifier_dir: str = Field("builtin", description="tile classifier model folder, or 'builtin'")
    allowed_dirs: tuple[Path, ...] = Field(
        (),
        max_length=64,
        description="absolute folders under which a start_scan request may name a model folder "
        "(besides 'builtin' and folders under daemon.data_root); a model is code-like input",
    )
    backend: Literal["auto", "tensorrt", "ort_cuda", "ort_cpu"] = Field(
        "auto", description="auto: the first of tensorrt, ort_cuda, ort_cpu that is installed and works"
    )
    engine_cache_dir: Path = Field(
        Path("/var/lib/wsi-runtime/engines"), description="TensorRT engines, keyed by ONNX/TensorRT/GPU/precision"
    )
    classify: bool = Field(True, description="single_shot: classify fields (background is not focused)")
    worker: Literal["process", "in_acquisition"] = Field(
        "process",
        description="process: an inference worker process owns the GPU (tiles by ring slot); "
        "in_acquisition: the models run inside the acquisition worker",
    )
    worker_start_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="inference worker: time allowed to load the models before its first heartbeat "
        "(a first TensorRT engine build is one long native call)",
    )


class MosaicConfig(_Section):
    chunk: int = Field(512, ge=64, le=4096, description="Zarr chunk edge (px); equal to the output tile")
    # "none" by default: the mosaic is a working copy, written once, read once by the writer, deleted after
    # the export. Stained tissue barely compresses losslessly (bench e2e recording: zstd level 1 0.72 of raw,
    # lz4 0.93), and zstd cost 11-34 daemon CPU-s/Gpx (a tenth to a third of the daemon) and half the tail at
    # 92k px wide; lz4 about 5. The price is disk: about 4.1 bytes per level-0 px, pyramid and edge padding
    # included. The scan's disk-space check (runtime.daemon.scan_job.disk_needed) must use that worst
    # case, which is also any codec's worst case (incompressible content).
    compressor: Literal["none", "zstd", "lz4"] = Field("none", description="Zarr chunk codec for the mosaic")
    keep_after_export: bool = Field(False, description="keep mosaic.zarr after the OME-TIFF is written")


class StitchConfig(_Section):
    """Online stitching: registration of each tile against its neighbours, position solve, blending."""

    registration: bool = Field(True, description="register tiles (false: place them at commanded positions)")
    stage_sigma_um: float = Field(2.5, gt=0.0, le=100.0, description="stage repeatability, 1 sigma (prior weight)")
    max_stage_error_um: float = Field(
        10.0, gt=0.0, le=500.0, description="largest error of one stage move (search range, band margin)"
    )
    lag_tiles: int = Field(0, ge=0, le=10000, description="later tiles a tile waits for before it is final")
    flatfield: bool = Field(True, description="estimate the vignetting from the tiles and correct it")
    flatfield_warmup_tiles: int = Field(
        16, ge=0, le=1000, description="tiles held at most while the flat-field is estimated (once per scan)"
    )
    min_ncc: float = Field(0.5, ge=0.0, le=1.0, description="reject pairs whose aligned overlaps correlate less")
    resampling_kernel: Literal["cubic", "lanczos3"] = Field(
        "cubic", description="subpixel placement kernel: cubic (Keys, 4 taps) or lanczos3 (7 taps, ~1.6x the cost)"
    )
    backend: Literal["cpu", "cupy", "auto"] = Field(
        "cpu",
        description="where resampling and the registration's NCC surface run: cpu (OpenCV), cupy (a CUDA GPU; "
        "an error if it cannot run) or auto (cupy if installed and its probe matches the CPU, else cpu)",
    )


_DICOM_TEXT = r"^[^\\\x00-\x1f\x7f]*$"


class WriterConfig(_Section):
    """Pyramidal OME-TIFF output."""

    tile: int = Field(512, ge=16, le=4096, multiple_of=16)
    compression: Literal["jpeg", "deflate", "zstd", "none"] = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    jpeg_subsampling: Literal["2x2", "2x1", "4x1", "1x1"] = Field(
        "2x2", description="JPEG chroma subsampling (YCbCr); 1x1 keeps full colour resolution"
    )
    min_level_size: int = Field(1024, ge=16, description="stop the pyramid once a level fits in this (px)")
    max_workers: int = Field(2, ge=1, le=64, description="tile read + compress threads")
    buffer_mib: int = Field(16, ge=1, le=1024, description="tiles in flight (MiB of raw tiles)")
    ome_zarr: bool = Field(False, description="also write the pyramid as OME-Zarr (NGFF 0.4): slide.ome.zarr")
    openslide_levels: bool = Field(
        True,
        description="also chain the lower levels as top-level IFDs (same tiles, ~380 bytes per level) so "
        "OpenSlide sees every level; false: the strict OME-TIFF layout (levels only as SubIFDs)",
    )
    # DICOM WSI: off by default -- the same JPEG bytes again on disk (no encoding cost, twice the space).
    dicom: bool = Field(
        False, description="also write DICOM WSI (Supplement 145) from the same tiles: slide.dicom/, a file per level"
    )
    # The identifiers' DICOM limits (PS3.5 6.2: LO/PN 64, SH 16 characters, no backslash or control
    # characters; a UID is digits and dots); empty: an anonymous slide, UIDs generated.
    dicom_patient_name: str = Field("", max_length=64, pattern=_DICOM_TEXT, description="DICOM PN, e.g. Doe^Jane")
    dicom_patient_id: str = Field("", max_length=64, pattern=_DICOM_TEXT)
    dicom_accession_number: str = Field("", max_length=16, pattern=_DICOM_TEXT)
    dicom_study_id: str = Field("", max_length=16, pattern=_DICOM_TEXT)
    dicom_study_uid: str = Field(
        "", max_length=64, pattern=r"^((0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+)?$", description="empty: a new study"
    )
    dicom_slide_id: str = Field(
        "", max_length=64, pattern=_DICOM_TEXT, description="the slide's (container) ID, e.g. its barcode"
    )


class FleetConfig(_Section):
    """``python -m runtime batch``: the LocalCluster it starts when no ``--scheduler`` is given."""

    workers: int = Field(2, ge=1, le=256, description="worker processes (one slide at a time each, by default)")
    threads_per_worker: int = Field(
        1, ge=1, le=64, description="slides one worker runs at once (each slide has its own writer threads)"
    )
    memory_limit_mib: int = Field(
        4096, ge=0, description="per worker: paused at 80%, restarted at 95% (0: system memory / workers)"
    )
    processes: bool = Field(True, description="workers in processes (false: threads of the batch command)")
    replay_driver: str = Field(
        "hw_sim.replay:open_replay_driver",
        pattern=r"^[\w.]+:\w+$",
        description="driver that replays a recording for batch restitch (module:callable, option 'recording')",
    )


class AnalysisConfig(_Section):
    """Slide analysis during the scan (runtime/analysis): tumour heatmap, lesions, nuclei, slide score."""

    enabled: bool = Field(False, description="analyse each completed scan's slide in an analysis worker")
    models: Literal["trained", "baseline"] = Field(
        "trained", description="trained: the model folders below; baseline: the classical baselines (no models)"
    )
    tumour_dir: str = Field("builtin", description="tumour classifier model folder, or 'builtin'")
    nuclei_dir: str = Field("builtin", description="nuclei detector model folder, or 'builtin'")
    slide_dir: str = Field(
        "builtin", description="slide (attention-MIL) model folder, 'builtin', or 'none' (score: max patch probability)"
    )
    nuclei: bool = Field(True, description="detect nuclei (nuclei.geojson, densities in the report)")
    backend: Literal["auto", "tensorrt", "ort_cuda", "ort_cpu"] = Field("auto", description="inference backend")
    batch_size: int = Field(64, ge=1, le=4096, description="tumour patches per model call")
    # 2 by default: on the 48 held-out bench slides half-patch steps centre a 50-100 µm lesion in some patch
    # (sensitivity 0.800 -> 0.911, slide AUC 0.963 -> 0.972) for ~3.8x the tumour model's patches, which
    # stay cheap beside the nuclei model (README, slide analysis).
    subdivide: int = Field(
        2, ge=1, le=4, description="tumour grid cells per patch side (2: half-patch steps, ~4x the tumour model calls)"
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="tumour probability that outlines a lesion")
    # On: every lesion up to 800 µm across re-outlined from 1 µm reads (runtime/analysis/lesion_head.py) and
    # faint map regions confirmed by it; figures in the README, slide analysis (python -m bench analysis).
    lesion_head: bool = Field(
        True,
        description="re-outline lesions (boxes up to 5 x 5 windows of 160 µm) with the pixel-level lesion head "
        "(1 µm reads) and add faint map regions it confirms",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness of the analysis while its scan runs (capture comes first); "
        "after the slide it runs at normal priority",
    )
    # 4 by default: about 0.2 CPU-s of the models on the 2-core x86 test machine (~0.05 CPU-s per Mpx),
    # so a busy machine that starves the niced feeding leaves about that much for after the slide.
    backlog_mpx: float = Field(
        4.0,
        ge=0.0,
        le=10000.0,
        description="level-0 megapixels of final rows the niced analysis may fall behind the scan before a "
        "thread at normal priority feeds them (down to half of it): larger leaves more work for after the "
        "slide, smaller runs more of it at normal priority beside the scan; 0: all at normal priority",
    )
    finish_timeout_s: float = Field(
        120.0, gt=0.0, description="after the slide is written, how long the scan waits for its analysis"
    )


class DaemonConfig(_Section):
    data_root: Path = Field(Path("/var/lib/wsi-runtime"), description="scans are written under here only")
    runtime_dir: Path = Field(Path("/run/wsi-runtime"), description="sockets and pid files")
    heartbeat_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="a worker silent this long counts as hung, unless it used CPU or waited on the disk meanwhile "
        "(slowed by load: it then gets up to 6 times this; runtime/daemon/liveness.py)",
    )
    # The stitcher's third must hold its own base (~192 MiB: runtime.workers.stitcher) and at
    # least 16 MiB of canvas: hence the lower bound.
    memory_budget_mib: int = Field(
        768,
        ge=624,
        le=1 << 20,
        description="peak RSS a scan's processes may use together; the stitcher keeps its canvas, waiting "
        "tiles and strips within its third (the rest spills to disk); report.json shows it against each peak",
    )
    worker_start: Literal["forkserver", "spawn"] = Field(
        "forkserver",
        description="how scans start their worker processes: forked from one server process the daemon starts "
        "with the runtime imported (about 0.01 CPU-s each), or spawned as fresh interpreters that import it "
        "(about 0.6 CPU-s each); both CUDA-safe (runtime/daemon/process.py)",
    )


class RuntimeConfig(_Section):
    daemon: DaemonConfig = DaemonConfig()
    control: ControlConfig = ControlConfig()
    driver: DriverConfig = DriverConfig()
    scan: ScanConfig = ScanConfig()
    focus: FocusConfig = FocusConfig()
    models: ModelsConfig = ModelsConfig()
    mosaic: MosaicConfig = MosaicConfig()
    stitch: StitchConfig = StitchConfig()
    writer: WriterConfig = WriterConfig()
    fleet: FleetConfig = FleetConfig()
    analysis: AnalysisConfig = AnalysisConfig()

    def endpoint(self, which: Literal["command", "event"]) -> str:
        raw = self.control.command_endpoint if which == "command" else self.control.event_endpoint
        # Only the one placeholder is substituted: str.format would choke on any other brace.
        return raw.replace("{runtime_dir}", str(self.daemon.runtime_dir))


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{key}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return "; ".join(parts)


def config_from_dict(data: dict[str, Any]) -> RuntimeConfig:
    """Validate a parsed config mapping; raise ConfigError naming each bad key."""
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration: {_describe(err)}") from None


def load_config(path: Path | None) -> RuntimeConfig:
    """Load a TOML config file (None: all defaults)."""
    if path is None:
        return RuntimeConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def with_overrides(cfg: RuntimeConfig, overrides: dict[str, Any]) -> RuntimeConfig:
    """A copy of ``cfg`` with nested overrides ({"focus": {"sweep_steps": 5}}) validated."""
    merged = cfg.model_dump()
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return config_from_dict(merged)
