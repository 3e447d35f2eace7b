"""``python -m runtime``: the daemon, its control client, mosaic export and config tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from runtime.config import ConfigError, RuntimeConfig, load_config
from runtime.errors import run_cli


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v), ensure_ascii=False)


def defaults_as_toml() -> str:
    """Every key with its default and its description, as a TOML file."""
    cfg = RuntimeConfig()
    lines = ["# wsi-runtime configuration: every key, with its default.", ""]
    for section_name in RuntimeConfig.model_fields:
        section = getattr(cfg, section_name)
        doc = (type(section).__doc__ or "").strip().splitlines()
        lines.append(f"[{section_name}]" + (f"  # {doc[0]}" if doc else ""))
        for key, info in type(section).model_fields.items():
            comment = f"  # {info.description}" if info.description else ""
            value = getattr(section, key)
            if value is None:  # TOML has no null: leave the key out, shown commented
                lines.append(f"# {key} ={comment or '  # unset'}")
            else:
                lines.append(f"{key} = {_toml_value(value)}{comment}")
        lines.append("")
    return "\n".join(lines)


def sweep(cfg: RuntimeConfig) -> int:
    """Unlink the shared-memory segments and the semaphores of daemons that no longer run (a live
    daemon's are left alone). What the daemon does at start, for systemd's ExecStopPost."""
    from runtime.ipc.lifetime import remove_stale_semaphores
    from runtime.ipc.ring import remove_stale_segments

    for what, names in (
        ("shared memory", remove_stale_segments()),
        ("semaphores", remove_stale_semaphores(cfg.daemon.runtime_dir)),
    ):
        if names:
            print(f"removed stale {what}: {', '.join(names)}")
    return 0


def analyze(args: argparse.Namespace) -> int:
    """``python -m runtime analyze SLIDE --out DIR``: the scan's analysis on an existing slide."""
    from runtime.analysis.pipeline import AnalysisError, analyze_file, baseline_models, load_models

    cfg = load_config(args.config).analysis
    try:
        if args.baseline:
            models = baseline_models()
        else:
            models = load_models(
                cfg.tumour_dir,
                cfg.nuclei_dir,
                cfg.slide_dir,
                backend=cfg.backend,
                with_nuclei=not args.no_nuclei,
                lesion_head=cfg.lesion_head,
            )
        summary = analyze_file(
            args.slide,
            args.out,
            models,
            nuclei=not args.no_nuclei,
            batch_size=cfg.batch_size,
            cam=args.cam,
            subdivide=cfg.subdivide,
            threshold=cfg.threshold,
        )
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "lesions"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from runtime.control.client import add_ctl_parser, run_ctl
    from runtime.fleet.cli import add_batch_parser, run_batch_command
    from runtime.output.cli import add_export_parser, run_export

    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("daemon", help="run the scanner daemon (systemd's ExecStart)")
    d.add_argument("--config", type=Path, default=None, help="TOML config file (defaults if omitted)")
    d.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    c = sub.add_parser("config", help="print the default config, or check a config file")
    c.add_argument("--check", type=Path, default=None, help="validate this file and print it resolved")
    w = sub.add_parser(
        "sweep",
        help="remove what a killed daemon left: shared memory, semaphores (systemd's ExecStopPost)",
    )
    w.add_argument("--config", type=Path, default=None, help="TOML config file (defaults if omitted)")
    k = sub.add_parser(
        "keys",
        help="make a CURVE key pair for TCP control (the daemon's, or a client's to put in its authorised folder)",
    )
    k.add_argument("folder", type=Path, help="folder for NAME.key (public) and NAME.key_secret (mode 0600)")
    k.add_argument("--name", default="server", help="key pair name (default: server)")
    an = sub.add_parser(
        "analyze",
        help="slide analysis of a pyramidal TIFF: tumour heatmap, lesions, nuclei, slide score, QuPath GeoJSON",
    )
    an.add_argument("slide", type=Path, help="pyramidal TIFF (our OME-TIFF, SVS, other tiled pyramids)")
    an.add_argument("--out", type=Path, required=True, help="folder for the outputs (created)")
    an.add_argument("--config", type=Path, default=None, help="TOML config: its [analysis] section (model folders)")
    an.add_argument("--baseline", action="store_true", help="the classical baselines instead of the trained models")
    an.add_argument("--no-nuclei", action="store_true", help="skip nuclei detection")
    an.add_argument(
        "--cam", type=int, default=0, metavar="K", help="also cam.png: the classifier's occlusion view of K top patches"
    )
    add_ctl_parser(sub)
    add_export_parser(sub)
    add_batch_parser(sub)
    args = p.parse_args(argv)
    try:
        if args.cmd == "daemon":
            from runtime.daemon.process import run_daemon

            run_daemon(load_config(args.config), args.log_level)
            return 0
        if args.cmd == "config":
            if args.check is None:
                print(defaults_as_toml())
            else:
                print(json.dumps(load_config(args.check).model_dump(mode="json"), indent=2))
            return 0
        if args.cmd == "sweep":
            return sweep(load_config(args.config))
        if args.cmd == "keys":
            from runtime.control.curve import CurveError, make_key_pair

            try:
                public, secret = make_key_pair(args.folder, args.name)
            except CurveError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"public key: {public}\nsecret key: {secret} (keep it on this machine)")
            return 0
        if args.cmd == "analyze":
            return analyze(args)
        if args.cmd == "ctl":
            return run_ctl(args)
        if args.cmd == "export":
            return run_export(args)
        if args.cmd == "batch":
            return run_batch_command(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(run_cli(main))
