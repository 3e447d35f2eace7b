"""``python -m export <command>``: train the scan-path models on hw_sim data and export them.

  python -m export data --kind autofocus|classifier [--split train ...]   render and cache data
  python -m export train-autofocus  [--data DIR] [--seed 0] [--out out/models/autofocus.pt]
  python -m export train-classifier [--data DIR] [--seed 0] [--out out/models/classifier.pt]
  python -m export onnx CHECKPOINT --out FOLDER                          model.onnx + model.json
  python -m export calibrate REC [REC ...] --init MODEL_DIR --out MODEL_DIR   fine-tune autofocus on
                                           an instrument's own z-stacks (self-labelled)
  python -m export tta MODEL_DIR --tta 4 --out MODEL_DIR   an autofocus folder's weights in a graph that
                                           averages its outputs over quarter turns of each crop
  python -m export train-tumour|train-nuclei|train-mil [--data DIR] [--out MODEL_DIR]   slide-analysis
                                           models (issue 13), trained and exported as model folders
  python -m export train-lesion-head [--cache DIR] [--budget-s 600] [--out MODEL_DIR]   the pixel head
                                           that re-outlines small lesions (training-range seeds only)

The committed models in ``runtime/ml/builtin/`` were made with ``python -m export all``
(the exact commands are recorded in each ``model.json`` under ``training``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.datasets import EXTRA_TRAIN_SPLITS
from runtime.errors import run_cli
from runtime.ml.model_folder import MODELS_DIR

DEFAULT_DATA = Path("out/export-data")
ANALYSIS_DATA = Path("out/analysis-data")


def _command_line(argv: Sequence[str] | None) -> str:
    """The command as typed (``model.json`` records it): ``argv``, or this process's arguments."""
    import shlex

    return "python -m export " + shlex.join(str(a) for a in (argv if argv is not None else sys.argv[1:]))


def _samples(kind: str, data_dir: Path, seed: int, n: int = 64, wide: int = 0) -> np.ndarray:
    """Real held-out inputs for the parity check (plus the data's own extremes)."""
    from export.train import _data

    d = _data(kind, "heldout", data_dir, seed, workers=2, wide=wide)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(d["x"]), min(n, len(d["x"])), replace=False)
    return np.asarray(d["x"][np.sort(idx)], np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train-autofocus", "train-classifier"):
        t = sub.add_parser(name)
        t.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset cache folder")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--epochs", type=int, default=None)
        t.add_argument("--workers", type=int, default=2, help="processes rendering data")
        t.add_argument("--out", type=Path, default=None)
        t.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
        t.add_argument(
            "--resume",
            action="store_true",
            help="continue an interrupted run of the same arguments from its last finished epoch "
            "(the state in OUT.partial, written after every epoch)",
        )
        t.add_argument(
            "--content",
            action="store_true",
            help="add train_content: stains, textures, photographs and (autofocus) objectives of every "
            "family; the autofocus model gains the magnitude head",
        )
        if name == "train-autofocus":
            t.add_argument("--lr", type=float, default=None)
            t.add_argument(
                "--init", type=Path, default=None, help="fine-tune from this checkpoint or autofocus model folder"
            )
            t.add_argument("--far", action="store_true", help="add the far-from-focus training set (train_far)")
            t.add_argument("--wide", type=int, default=0, help="v2 model: wide context window in px (e.g. 512)")
            t.add_argument("--edge", action="store_true", help="v2: add |defocus| 7-12.5 µm (train_edge)")
            t.add_argument("--small", action="store_true", help="v2: add 256-px frames (train_small)")
            t.add_argument("--optics", action="store_true", help="v2: add 64 more objectives (train_optics)")
            t.add_argument(
                "--tissue",
                action="store_true",
                help="v2, with --content: add train_tissue, fields of the real H&E images licensed for training "
                "(export.content_mix.TRAINING_TISSUE, from $WSI_TRAINING_TISSUE_DIR or out/training-tissue)",
            )
        else:
            t.add_argument("--hard", action="store_true", help="add the faint-stain / tinted-glass set (train_hard)")
            t.add_argument(
                "--extra",
                nargs="+",
                default=[],
                metavar="SPLIT",
                help="more training splits (train_artifacts, train_folds, train_bubbles and their _hard sets)",
            )
            t.add_argument(
                "--init", type=Path, default=None, help="fine-tune every layer of this classifier model folder"
            )
            t.add_argument("--lr", type=float, default=None)
            t.add_argument("--threads", type=int, default=2, help="torch threads (1 on cores that other jobs share)")
    d = sub.add_parser("data", help="render and cache a dataset split")
    d.add_argument("--kind", choices=["autofocus", "classifier"], required=True)
    d.add_argument(
        "--split",
        choices=["train", *EXTRA_TRAIN_SPLITS, "val", "heldout", "heldout_hard", "heldout_content"],
        action="append",
    )
    d.add_argument("--data", type=Path, default=DEFAULT_DATA)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--wide", type=int, default=0, help="autofocus v2 data (wide context window in px)")
    o = sub.add_parser("onnx", help="export a checkpoint to a model folder (parity-checked)")
    o.add_argument("checkpoint", type=Path)
    o.add_argument("--out", type=Path, required=True, help="model folder to write")
    o.add_argument("--data", type=Path, default=DEFAULT_DATA, help="held-out samples for the parity check")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--atol", type=float, default=1e-3)
    c = sub.add_parser("calibrate", help="fine-tune the autofocus model on recorded z-stacks (labels from the stacks)")
    c.add_argument("recordings", type=Path, nargs="+", metavar="REC", help="recordings (wsi-recording folders)")
    c.add_argument("--init", required=True, help="autofocus model folder to start from, or 'builtin'")
    c.add_argument("--out", type=Path, required=True, help="model folder to write")
    c.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: calibrate's)")
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--crops", type=int, default=None, help="crops per training plane (0: all)")
    c.add_argument("--holdout", type=float, default=None, help="fraction of the labelled fields held out")
    c.add_argument("--near-weight", type=float, default=None, help="loss weight of planes near focus (default 10)")
    c.add_argument(
        "--freeze-blocks",
        type=int,
        default=None,
        help="frozen_front method: keep conv blocks 1..N, train the rest on cached features (0: full fine-tune)",
    )
    c.add_argument("--batch", type=int, default=None, help="training batch (default: the method's)")
    c.add_argument(
        "--l2sp", type=float, default=None, help="L2-SP weight towards the starting weights (full fine-tune; 0: off)"
    )
    c.add_argument(
        "--contrast-jitter",
        type=float,
        default=None,
        help="log-normal sigma of a per-crop gain on the contrast channels (full fine-tune; default 0.1; 0: off; "
        "0.2 measured: real tissue better, gravel worse)",
    )
    c.add_argument(
        "--tta",
        type=int,
        default=None,
        choices=(1, 2, 4, 8),
        help="exported graph averages the outputs over this many flips/turns of each crop (default 4; 1: none)",
    )
    c.add_argument(
        "--single-pass",
        action="store_true",
        help="export the hold-out pass's model (default: measure on held-out fields, then refit on every field)",
    )
    c.add_argument(
        "--content-targets",
        choices=("init", "stack"),
        default=None,
        help="what the content head is fine-tuned towards: the init model's own probabilities (default) or, where "
        "a crop's region of the field's z-stack has a verdict, that verdict (peak: content, flat: none)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 2; 1 is faster on cores that other jobs hold: OpenMP threads spin)",
    )
    tt = sub.add_parser(
        "tta", help="an autofocus folder's weights in a graph that averages its outputs over turns of each crop"
    )
    tt.add_argument("init", type=Path, metavar="MODEL_DIR", help="autofocus model folder to wrap")
    tt.add_argument(
        "--tta", type=int, default=4, choices=(2, 4, 8), help="transforms averaged (default 4: quarter turns)"
    )
    tt.add_argument("--out", type=Path, required=True, help="model folder to write")
    for name, what in (
        ("train-tumour", "tumour patch classifier"),
        ("train-nuclei", "nuclei centroid detector"),
        ("train-mil", "attention-MIL slide model (embeds its bags with --tumour)"),
    ):
        an = sub.add_parser(name, help=f"train the {what} and export it as a model folder (parity-checked)")
        an.add_argument("--data", type=Path, default=ANALYSIS_DATA, help="rendered-data cache folder")
        an.add_argument("--seed", type=int, default=0)
        an.add_argument("--epochs", type=int, default=None)
        an.add_argument("--workers", type=int, default=2, help="processes rendering data")
        an.add_argument("--out", type=Path, default=None, help="model folder to write (default: the builtin one)")
        if name == "train-mil":
            an.add_argument("--tumour", type=Path, default=MODELS_DIR / "tumour", help="tumour model folder")
        if name in ("train-tumour", "train-mil"):
            an.add_argument(
                "--vesicular-max",
                type=float,
                default=0.0,
                help="training slides' carcinoma look: each lesion's nuclei up to this vesicular, in [0, 1] "
                "(hw_sim SlideSpec.vesicular_max; default 0: the hyperchromatic look only)",
            )
        if name == "train-tumour":
            an.add_argument(
                "--both-looks",
                action="store_true",
                help="with --vesicular-max: train on every slide drawn both ways, the default look and that one",
            )
            an.add_argument(
                "--init",
                type=Path,
                default=None,
                help="start from this checkpoint (--epochs 0: re-calibrate and re-export only)",
            )
    lh = sub.add_parser(
        "train-lesion-head",
        help="train the small-lesion pixel head (training-range seeds only) "
        "and export it as a model folder (parity-checked)",
    )
    lh.add_argument("--cache", type=Path, default=ANALYSIS_DATA / "lesion-head", help="rendered-window cache")
    lh.add_argument("--train-first", type=int, default=320000)
    lh.add_argument("--train-slides", type=int, default=36)
    lh.add_argument("--dev-first", type=int, default=300000)
    lh.add_argument("--dev-slides", type=int, default=9)
    lh.add_argument("--budget-s", type=float, default=600.0, help="training time (s)")
    lh.add_argument("--seed", type=int, default=0)
    lh.add_argument("--workers", type=int, default=2, help="processes rendering slides")
    lh.add_argument("--out", type=Path, default=MODELS_DIR / "lesion_head")
    lh.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this state dict (.pt) or lesion-head model folder (its ONNX weights)",
    )
    lh.add_argument("--lr", type=float, default=2e-3)
    lh.add_argument(
        "--vesicular-max",
        type=float,
        default=0.0,
        help="the slides' carcinoma look: each lesion's nuclei up to this vesicular, in [0, 1] (default 0)",
    )
    lh.add_argument(
        "--both-looks",
        action="store_true",
        help="with --vesicular-max: every slide's windows in the default look and in that one",
    )
    lh.add_argument(
        "--other-content",
        type=float,
        default=0.0,
        help="share of each batch from export.content_mix textures/photographs, target all zero",
    )
    lh.add_argument("--other-textures", type=int, default=150)
    lh.add_argument("--other-photos", type=int, default=150)
    lh.add_argument("--colour-jitter", type=float, default=0.0, help="optical-density jitter of the simulated crops")
    lh.add_argument(
        "--shift",
        action="store_true",
        help="crops at every 1 um offset, not only on the 4 um output grid (a phase-invariant head)",
    )
    lh.add_argument("--crop", type=int, default=96, help="training crop side (px at 1 um, a multiple of 4)")
    lh.add_argument(
        "--antialias", action="store_true", help="anti-aliased pools (max at stride 1, then a [1 2 1] blur at stride 2)"
    )
    lh.add_argument(
        "--ring-weight",
        type=float,
        default=0.0,
        help="extra loss weight on the truth's inner ring (--ring-um) in small-lesion windows (the nests' stroma)",
    )
    lh.add_argument("--ring-um", type=int, default=12, help="width of that ring inside the truth's edge (um)")
    lh.add_argument(
        "--truth-1um",
        action="store_true",
        help="targets from the cache's 1 um truth (exact at every phase), not its 4 um cells",
    )
    lh.add_argument(
        "--ring-outer", action="store_true", help="weight the band as wide outside the truth's edge too (no bias)"
    )
    a = sub.add_parser("all", help="train both models and export them into runtime/ml/builtin/")
    a.add_argument("--data", type=Path, default=DEFAULT_DATA)
    a.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from export import train

    if args.cmd == "data":
        for split in args.split or ["train", "val", "heldout"]:
            x = train._data(args.kind, split, args.data, args.seed, args.workers, args.wide)
            print(f"{args.kind} {split}: {x['x'].shape}")
        return 0
    if args.cmd == "train-autofocus":
        out = args.out or Path(f"out/models/autofocus-seed{args.seed}.pt")
        kw: dict[str, Any] = {"epochs": args.epochs} if args.epochs else {}
        if args.lr:
            kw["lr"] = args.lr
        kw.update(init=args.init, far=args.far, wide=args.wide, edge=args.edge, small=args.small, optics=args.optics)
        kw.update(content=args.content, device=args.device, tissue=args.tissue, resume=args.resume)
        if args.init is not None and args.init.is_dir():  # a folder's fine-tune: the exact command goes into model.json
            kw["command"] = _command_line(argv)
        r = train.train_autofocus(args.data, out, args.seed, workers=args.workers, **kw)
        print(json.dumps(r["heldout_metrics"], indent=2))
        print(f"checkpoint: {out}")
        return 0
    if args.cmd == "train-classifier":
        out = args.out or Path(f"out/models/classifier-seed{args.seed}.pt")
        kw = {"epochs": args.epochs} if args.epochs else {}
        if args.lr:
            kw["lr"] = args.lr
        kw.update(content=args.content, device=args.device, init=args.init, extra_splits=tuple(args.extra))
        kw["threads"] = args.threads
        kw["resume"] = args.resume
        if args.init is not None or args.extra:  # the exact command goes into model.json
            kw["command"] = _command_line(argv)
        r = train.train_classifier(args.data, out, args.seed, workers=args.workers, hard=args.hard, **kw)
        print(json.dumps(r["heldout_metrics"], indent=2))
        print(f"checkpoint: {out}")
        return 0
    if args.cmd == "onnx":
        import torch

        from export.onnx_export import export_checkpoint

        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        kind = "autofocus" if ckpt["arch"] == "AutofocusNet" else "classifier"
        wide = int(ckpt.get("preprocess", {}).get("wide", 0))
        meta = export_checkpoint(args.checkpoint, args.out, _samples(kind, args.data, args.seed, wide=wide), args.atol)
        print(f"wrote {args.out}/model.onnx (sha256 {meta['onnx_sha256'][:12]}...), parity {meta['parity']}")
        return 0
    if args.cmd == "calibrate":
        if args.threads is not None and args.threads < 1:
            p.error(f"calibrate: --threads must be >= 1, got {args.threads}")

        from export.calibrate import calibrate

        kw = {
            k: getattr(args, k)
            for k in (
                "epochs",
                "lr",
                "crops",
                "holdout",
                "near_weight",
                "freeze_blocks",
                "batch",
                "l2sp",
                "contrast_jitter",
                "tta",
                "threads",
            )
            if getattr(args, k) is not None
        }
        cmd = _command_line(argv)
        if args.single_pass:
            kw["refit"] = False
        if args.content_targets is not None:
            kw["content_from_stack"] = args.content_targets == "stack"
        cal = calibrate(args.recordings, args.init, args.out, seed=args.seed, command=cmd, **kw)
        print(json.dumps({k: cal[k] for k in ("fields_labelled", "fields_skipped", "seconds")}))
        print(json.dumps({k: cal["procedure"][k] for k in ("name", "exported_model", "heldout_metrics_model")}))
        print(
            json.dumps(
                {"heldout_before": cal["heldout_metrics_before"], "heldout_after": cal["heldout_metrics_after"]},
                indent=2,
            )
        )
        print(f"wrote {args.out}/model.onnx + model.json")
        return 0
    if args.cmd == "tta":
        from export.calibrate import wrap_tta

        cmd = _command_line(argv)
        meta = wrap_tta(args.init, args.tta, args.out, command=cmd)
        print(f"wrote {args.out}/model.onnx (sha256 {meta['onnx_sha256'][:12]}...), parity {meta['parity']}")
        return 0
    if args.cmd in ("train-tumour", "train-nuclei", "train-mil"):
        task = {"train-tumour": "tumour", "train-nuclei": "nuclei", "train-mil": "slide_mil"}[args.cmd]
        out = args.out or MODELS_DIR / task
        kw = {"epochs": args.epochs} if args.epochs is not None else {}
        if task != "nuclei" and not 0.0 <= args.vesicular_max <= 1.0:
            print(f"error: --vesicular-max must be in [0, 1], got {args.vesicular_max:g}", file=sys.stderr)
            return 2
        if task == "tumour":
            from export.train_tumour import train_tumour

            if args.both_looks and not args.vesicular_max:
                print("error: --both-looks needs a --vesicular-max above 0 (the second look)", file=sys.stderr)
                return 2
            r = train_tumour(
                args.data,
                out,
                args.seed,
                workers=args.workers,
                init=args.init,
                vesicular_max=args.vesicular_max,
                both_looks=args.both_looks,
                **kw,
            )
        elif task == "nuclei":
            from export.train_nuclei import train_nuclei

            r = train_nuclei(args.data, out, args.seed, workers=args.workers, **kw)
        else:
            from export.train_mil import train_mil

            r = train_mil(
                args.data, out, args.tumour, args.seed, workers=args.workers, vesicular_max=args.vesicular_max, **kw
            )
        print(json.dumps(r["heldout_metrics"], indent=2))
        print(f"wrote {out}/model.onnx + model.json")
        return 0
    if args.cmd == "train-lesion-head":
        from export.train_lesion_head import train_lesion_head

        r = train_lesion_head(
            args.out,
            cache=args.cache,
            train_first=args.train_first,
            train_slides=args.train_slides,
            dev_first=args.dev_first,
            dev_slides=args.dev_slides,
            budget_s=args.budget_s,
            seed=args.seed,
            workers=args.workers,
            init=args.init,
            lr=args.lr,
            other_content=args.other_content,
            other_textures=args.other_textures,
            other_photos=args.other_photos,
            colour_jitter=args.colour_jitter,
            shift=args.shift,
            crop=args.crop,
            antialias=args.antialias,
            ring_weight=args.ring_weight,
            ring_um=args.ring_um,
            ring_outer=args.ring_outer,
            truth_1um=args.truth_1um,
            vesicular_max=args.vesicular_max,
            both_looks=args.both_looks,
        )
        print(json.dumps(r["heldout_metrics"], indent=2))
        print(f"wrote {args.out}/model.onnx + model.json")
        return 0
    if args.cmd == "all":
        for kind in ("autofocus", "classifier"):
            ckpt = Path(f"out/models/{kind}-seed{args.seed}.pt")
            fn = train.train_autofocus if kind == "autofocus" else train.train_classifier
            fn(args.data, ckpt, args.seed)
            main(
                ["onnx", str(ckpt), "--out", str(MODELS_DIR / kind), "--data", str(args.data), "--seed", str(args.seed)]
            )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(run_cli(main))
