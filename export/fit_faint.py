"""Choose the faint-region threshold of a lesion head (:func:`runtime.analysis.lesion_head.confirm_faint`).

``python -m export.fit_faint [--models ROOT] [--first-seed 340000] [--slides 64] [--vesicular-max V]
[--both-looks] [--lows 0.35 0.3 0.25 0.2 0.15] [--write]``

A small low-grade lesion can peak under the tumour map's 0.5, so no lesion forms there; the head is
shown the map's regions above a lower threshold and adds the ones it finds tumour in. How faint a
tumour model draws such a lesion is that model's: a model trained on more looks of carcinoma draws the
smallest lesions fainter (the stop-39 both-looks model: 0.17-0.36 on lesions of 2,000-4,500 µm² that
the committed one drew at 0.4-0.9), so the threshold belongs to the pair of models.

This renders bench-style slides of training-range seeds (``bench.analysis.render_slide`` with
``held_out=False``; held-out seeds 900000+ are refused), runs the analysis of the models under
``ROOT`` (``tumour``, ``lesion_head``; no nuclei, the grid of ``[analysis] subdivide``) once per slide
and, for each threshold of ``--lows``, outlines the lesions as the runtime does (the map's lesions,
re-outlined by the head, then the faint regions it confirms) and scores them with the bench's
functions: sensitivity at <= 0.5 false positives per slide, false positives, head calls, Dice over all the
slides. The choice is the highest threshold (fewest head calls) whose sensitivity is the best of the list;
with ``--both-looks`` each slide is also drawn in the ``--vesicular-max`` look and the two looks' slides are
scored together. ``--write`` stores it in ``ROOT/lesion_head/model.json`` under ``"faint_regions"``
(threshold, minimum outline, the rows it was chosen on, the command); the head's ONNX file is untouched.
About 10 minutes on 2 CPU cores for 64 slides in one look.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.ml.model_folder import write_model_json

DEFAULT_LOWS = (0.35, 0.3, 0.25, 0.2, 0.15)
# What each slide's scoring keeps per threshold (bench.analysis.score_slide's keys and the head's calls).
SCORED = ("seed", "tumour", "n_truth", "detections", "truth_mm2", "pred_mm2", "intersection_mm2", "head_calls")


@dataclasses.dataclass(frozen=True)
class Job:
    seed: int
    index: int
    size_um: float
    vesicular_max: float
    root: str | None
    lows: tuple[float, ...]


_MODELS: Any = None


def _models(root: str | None) -> Any:
    """The analysis models of ``root`` with its lesion head (loaded once per worker process)."""
    global _MODELS
    if _MODELS is None:
        from bench.analysis import lesion_head_dir, trained_models
        from runtime.analysis.lesion_head import load_lesion_head

        path = Path(root) if root else None
        models, _why = trained_models(path)
        if models is None:
            raise SystemExit(f"error: no tumour model under {root}: {_why}")
        head = load_lesion_head(lesion_head_dir(path), "ort_cpu")
        _MODELS = dataclasses.replace(models, lesion_head=head)
    return _MODELS


def score_slide_at(job: Job) -> dict[str, dict[str, Any]]:
    """One slide rendered, analysed and its lesions re-outlined by the head once; at each faint threshold
    the faint regions added and the whole scored (``bench.analysis.score_slide``), keyed by threshold."""
    from bench.analysis import PX_UM, ArraySource, default_subdivide, render_slide, score_slide
    from runtime.analysis.pipeline import analyze_source, head_outlined, slide_lesions

    models = _models(job.root)
    slide = render_slide(job.seed, job.index, job.size_um, held_out=False, vesicular_max=job.vesicular_max)
    src = ArraySource(slide.levels, PX_UM)
    res = analyze_source(src, models, nuclei=False, subdivide=default_subdivide())
    outlined = head_outlined(res, models, src)  # the same at every threshold: read and re-outlined once
    out = {}
    for low in job.lows:
        found = slide_lesions(res, models, src, faint_threshold=low, outlined=outlined)
        scored = score_slide(slide, res, found)
        scored["head_calls"] = int(res.stats.get("lesion_head_calls", 0))
        out[f"{low:g}"] = {k: scored[k] for k in SCORED}
    return out


def summarise(per_low: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per threshold: sensitivity at <= 0.5 FP per slide, FROC score, false positives, head calls, Dice."""
    from bench.analysis import froc

    rows = []
    for low, per in per_low.items():
        fr = froc(per, len(per))
        inter = sum(p["intersection_mm2"] for p in per)
        both = sum(p["truth_mm2"] + p["pred_mm2"] for p in per)
        rows.append(
            {
                "threshold": float(low),
                "sensitivity_at_0.5_fp": round(float(fr["sensitivity_at_0.5_fp"]), 4),
                "froc_score": round(float(fr["froc_score"]), 4),
                "lesions": int(fr["lesions"]),
                "false_positives": sum(1 for p in per for d in p["detections"] if not d["hits"]),
                "head_calls": sum(p["head_calls"] for p in per),
                # Pooled over every slide: a tumour-free slide's false lesions count against it (bench
                # analysis's dice_pooled is over the tumour slides only).
                "dice_all_slides": round(2 * inter / both, 4) if both else None,
            }
        )
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest threshold among those with the best sensitivity (the fewest head calls for it)."""
    best = max(r["sensitivity_at_0.5_fp"] for r in rows)
    return max((r for r in rows if r["sensitivity_at_0.5_fp"] == best), key=lambda r: r["threshold"])


def write_choice(head_dir: Path, row: dict[str, Any], info: dict[str, Any]) -> None:
    """Store the choice in ``head_dir/model.json`` under ``"faint_regions"`` (other keys kept)."""
    from runtime.analysis.lesion_head import CANDIDATE_MIN_UM2

    path = head_dir / "model.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["faint_regions"] = {"threshold": row["threshold"], "min_um2": CANDIDATE_MIN_UM2, **info}
    write_model_json(head_dir, meta)


def main(argv: Sequence[str] | None = None) -> int:
    from hw_sim.lesions import check_training_seed
    from runtime.ml.model_folder import default_model_dir

    p = argparse.ArgumentParser(prog="python -m export.fit_faint", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="analysis model root with tumour and lesion_head folders (default: the committed ones)",
    )
    p.add_argument("--first-seed", type=int, default=340_000, help="training-range seeds (below 900000)")
    p.add_argument("--slides", type=int, default=64)
    p.add_argument("--size-um", type=float, default=1500.0)
    p.add_argument("--vesicular-max", type=float, default=0.0, help="the slides' carcinoma look (bench analysis's)")
    p.add_argument("--both-looks", action="store_true", help="score every slide in both looks (needs --vesicular-max)")
    p.add_argument("--lows", type=float, nargs="+", default=list(DEFAULT_LOWS), help="faint thresholds to try")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--write", action="store_true", help="store the choice in the lesion head's model.json")
    args = p.parse_args(argv)
    if args.both_looks and not args.vesicular_max:
        p.error("--both-looks needs --vesicular-max (the second look)")
    bad = [v for v in args.lows if not 0.0 < v < 0.5]
    if bad:
        p.error(f"--lows must lie in (0, 0.5) (below the 0.5 detection threshold), got {bad}")
    head_dir = (args.models / "lesion_head") if args.models else default_model_dir("lesion_head")
    if args.write and not (head_dir / "model.json").is_file():
        p.error(f"--write: no lesion head folder at {head_dir}")
    looks = (0.0, args.vesicular_max) if args.both_looks else (args.vesicular_max,)
    root = str(args.models) if args.models else None
    lows = tuple(args.lows)
    try:
        seeds = [check_training_seed(args.first_seed + i) for i in range(args.slides)]
    except ValueError as err:
        p.error(str(err))
    jobs = [Job(seed, i, args.size_um, look, root, lows) for look in looks for i, seed in enumerate(seeds)]
    if args.workers <= 1:
        results = [score_slide_at(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(score_slide_at, jobs, chunksize=1)
    per_low = {f"{low:g}": [r[f"{low:g}"] for r in results] for low in lows}
    rows = summarise(per_low)
    pick = choose(rows)
    seed_range = f"{args.first_seed}-{args.first_seed + args.slides - 1}"
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"chosen": pick["threshold"], "seeds": seed_range, "looks": list(looks)}))
    if args.write:
        cmd = (
            f"python -m export.fit_faint --first-seed {args.first_seed} --slides {args.slides} "
            f"--size-um {args.size_um:g}"
            + (f" --vesicular-max {args.vesicular_max:g}" if args.vesicular_max else "")
            + (" --both-looks" if args.both_looks else "")
            + " --lows "
            + " ".join(f"{v:g}" for v in lows)
            + " --write"
        )
        info = {"seeds": seed_range, "looks": list(looks), "chosen_on": rows, "command": cmd}
        write_choice(head_dir, pick, info)
        print(f"wrote {head_dir / 'model.json'} faint_regions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
