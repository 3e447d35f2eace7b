"""``python -m hw_sim``: synthesise recordings, render their truth, replay them through the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hw_sim", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write a synthetic slide recording (Zarr v3 z-stacks per field)")
    s.add_argument("--out", type=Path, required=True, help="recording folder to create")
    s.add_argument("--fields", type=int, nargs=2, metavar=("NX", "NY"), default=(4, 3))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tile", type=int, default=512, help="camera frame edge (px)")
    s.add_argument("--pixel-size", type=float, default=0.25, help="µm per pixel in the sample plane")
    s.add_argument("--overlap", type=float, default=0.10)
    s.add_argument("--z-planes", type=int, default=13, help="planes per field z-stack")
    s.add_argument("--z-step", type=float, default=0.5, help="µm between planes")
    s.add_argument("--stage-error", type=float, default=2.0, help="stage positioning error, 1 sigma (µm)")
    s.add_argument("--artifacts", type=int, default=0, help="pen ink, bubbles, dust, folds on the slide")
    s.add_argument("--camera-rotation", type=float, default=0.0, help="camera rotated vs the stage axes (degrees)")
    s.add_argument("--stage-scale-error", type=float, default=0.0, help="stage travels (1 + s) x commanded")
    s.add_argument("--tissue-extent", type=float, default=1.0, help="tissue only in this top-left fraction")
    s.add_argument(
        "--objective",
        default="training",
        choices=("training", "flipped", "apochromat", "strong"),
        help="objective preset (hw_sim.synth.OBJECTIVES): spherical aberration and axial colour",
    )
    s.add_argument("--spherical-waves", type=float, default=None, help="spherical aberration (RMS waves, either sign)")
    s.add_argument(
        "--chromatic-shift",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="axial colour: best-focus z of each channel (µm, either sign)",
    )
    s.add_argument(
        "--content",
        default="synthetic",
        help="tissue look: synthetic (procedural H&E), ihc (real colon tissue), brick, gravel, grass, file:PATH",
    )
    s.add_argument("--content-px-um", type=float, default=0.0, help="µm per content image pixel (0: its default)")
    s.add_argument(
        "--content-region",
        default="",
        choices=("", "left", "right", "top", "bottom"),
        help="show only this half of the content image (opposite halves share no pixel; default: the whole image)",
    )
    s.add_argument("--lesions", type=int, default=0, help="tumour lesions on the slide (hw_sim.lesions)")
    s.add_argument("--mimics", type=int, default=0, help="benign crowded regions that are not tumour (hard negatives)")
    s.add_argument(
        "--vesicular-max",
        type=float,
        default=0.0,
        help="each lesion's nuclei from hyperchromatic (0) up to this vesicular (1: larger, pale, a chromatin rim and "
        "a nucleolus); default 0",
    )
    s.add_argument("--force", action="store_true", help="overwrite an existing recording")
    s.add_argument(
        "--frames",
        choices=["zstd", "raw"],
        default="zstd",
        help="how frames are stored: zstd (about 0.77 of raw) or raw (replayed without decoding)",
    )

    t = sub.add_parser("truth", help="render the in-focus ground truth of a synthetic recording's area")
    t.add_argument("recording", type=Path)
    t.add_argument("--out", type=Path, default=None, help="output TIFF (tiled, RGB)")
    t.add_argument(
        "--annotations", type=Path, default=None, help="GeoJSON of tumour lesions (and nuclei) in mosaic pixels"
    )
    t.add_argument("--nuclei", type=Path, default=None, help="write the nuclei into this GeoJSON instead")

    r = sub.add_parser("replay", help="scan a recording through the daemon; writes slide.ome.tif + report.json")
    r.add_argument("recording", type=Path)
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--config", type=Path, default=None, help="runtime TOML config (defaults if omitted)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--resume", action="store_true", help="continue the interrupted scan in --out (its journal)")

    k = sub.add_parser("repack", help="copy a recording with its frames stored another way (same pixels)")
    k.add_argument("recording", type=Path)
    k.add_argument("--out", type=Path, required=True, help="the new recording's folder")
    k.add_argument("--frames", choices=["zstd", "raw"], required=True)

    d = sub.add_parser("demo", help="synthesise a small slide and scan it (the README's main job)")
    d.add_argument("--out", type=Path, default=Path("out/demo"))
    d.add_argument("--fields", type=int, nargs=2, metavar=("NX", "NY"), default=(4, 3))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-analysis", action="store_true", help="scan without the slide analysis")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "synth":
            from hw_sim.synth import SynthParams, objective_params, synthesize

            objective = objective_params(args.objective)
            if args.spherical_waves is not None or args.chromatic_shift is not None:
                objective["objective"] = "custom"
            if args.spherical_waves is not None:
                objective["spherical_waves"] = args.spherical_waves
            if args.chromatic_shift is not None:
                objective["chromatic_shift_um"] = tuple(args.chromatic_shift)
            params = SynthParams(
                fields_x=args.fields[0],
                fields_y=args.fields[1],
                seed=args.seed,
                tile=args.tile,
                pixel_size_um=args.pixel_size,
                overlap=args.overlap,
                z_planes=args.z_planes,
                z_step_um=args.z_step,
                stage_error_um=args.stage_error,
                artifacts=args.artifacts,
                camera_rotation_deg=args.camera_rotation,
                stage_scale_error=args.stage_scale_error,
                tissue_extent=args.tissue_extent,
                content=args.content,
                content_px_um=args.content_px_um,
                content_region=args.content_region,
                lesions=args.lesions,
                mimics=args.mimics,
                vesicular_max=args.vesicular_max,
                **objective,  # type: ignore[arg-type]
            )
            synthesize(args.out, params, overwrite=args.force, progress=True, compress=args.frames == "zstd")
            print(f"recording: {args.out}")
        elif args.cmd == "truth":
            from hw_sim.truth import write_annotations, write_truth

            if args.nuclei is not None and args.annotations is None:
                raise ValueError("truth: --nuclei goes with --annotations")
            if args.out is None and args.annotations is None:
                raise ValueError("truth: give --out (the in-focus image) and/or --annotations (the GeoJSON)")
            if args.annotations is not None:
                n_lesions, n_nuclei = write_annotations(args.recording, args.annotations, args.nuclei)
                where = f" in {args.nuclei}" if args.nuclei else ""
                print(f"annotations: {args.annotations} ({n_lesions} lesions and mimics, {n_nuclei} nuclei{where})")
            if args.out is not None:
                shape = write_truth(args.recording, args.out)
                print(f"truth: {args.out} ({shape[1]} x {shape[0]} px)")
        elif args.cmd == "replay":
            from hw_sim.replay_job import run_replay

            run_replay(
                args.recording, args.out, config_path=args.config, progress=not args.no_progress, resume=args.resume
            )
        elif args.cmd == "repack":
            from runtime.devices.recording import repack_frames

            repack_frames(args.recording, args.out, compress=args.frames == "zstd")
            print(f"recording: {args.out} (frames {args.frames})")
        elif args.cmd == "demo":
            from hw_sim.replay_job import run_demo

            run_demo(args.out, fields=tuple(args.fields), seed=args.seed, analysis=not args.no_analysis)
    except (ValueError, OSError) as err:  # RecordingError, ConfigError, DriverError are ValueError/RuntimeError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
