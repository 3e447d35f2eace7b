"""Tumour ground truth in the simulator: lesions render like carcinoma, slides without them render
as before, and the GeoJSON truth (``python -m hw_sim truth REC --annotations``) matches the pixels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import shapely
from shapely.geometry import shape

from hw_sim.__main__ import main as hw_sim_main
from hw_sim.lesions import HELD_OUT_SEEDS, check_training_seed, lesion_layout
from hw_sim.slide import _NUC_EDGE, _NUC_MAX_AXIS_UM, RUIFROK_E, RUIFROK_H, SlideSpec, SyntheticSlide, _draw_nuclei
from hw_sim.truth import TruthRenderer, mosaic_shape
from runtime.devices.recording import Recording

F64 = npt.NDArray[np.float64]

# ------------------------------------------------------------------ slides without lesions are unchanged

# Computed with the code before lesions existed (commit 06aebbb): sha256 (first 16 hex digits) of the
# float32 transmittance and of the sorted nucleus centres (x then y, float64) that the region's render
# drew (every nucleus with its centre within the profile reach of the region), and a few values that
# let a CPU whose float32 sin/exp differ in the last bit (numpy's SIMD dispatch) still check them.
HEAD_RENDERS: list[dict[str, Any]] = [
    {
        "spec": {"seed": 3, "origin_x_um": 1000.0, "origin_y_um": 750.0, "width_um": 600.0, "height_um": 450.0},
        "region": (1100.0, 900.0, 96, 128, 0.25),
        "sha": "d031f9df8ead003a",
        "nuclei_sha": "c93b0a2f762eabe8",
        "n_nuclei": 23,
        "first_nucleus": (1095.1237982905004, 922.5633413029999),
        "mean": (0.635462538, 0.406971983, 0.729846167),
        "pixels": ((0.814917266368866, 0.5538135766983032, 0.8615397810935974),
                   (0.8825793266296387, 0.6854149103164673, 0.9025920033454895)),
    },
    {
        "spec": {"seed": 0},
        "region": (5000.0, 4000.0, 64, 80, 0.5),
        "sha": "43c2d1e8d406482a",
        "nuclei_sha": "647cabfda460418f",
        "n_nuclei": 26,
        "first_nucleus": (4994.232288082676, 4003.4510027704027),
        "mean": (0.698244766, 0.461569384, 0.771641243),
        "pixels": ((0.8822190165519714, 0.6814677119255066, 0.9020130634307861),
                   (0.8709100484848022, 0.5678073763847351, 0.8839095830917358)),
    },
    {
        "spec": {"seed": 7, "artifacts": 6, "origin_x_um": 1000.0, "origin_y_um": 750.0, "width_um": 3000.0,
                 "height_um": 2000.0},
        "region": (1500.0, 1200.0, 120, 100, 1.0),
        "sha": "8cb518b907c9517c",
        "nuclei_sha": "696f8b598fac66f9",
        "n_nuclei": 54,
        "first_nucleus": (1495.3882142881423, 1311.0851513873033),
        "mean": (0.850977407, 0.666805482, 0.875968058),
        "pixels": ((0.5296084880828857, 0.34036698937416077, 0.7094544768333435),
                   (0.8550848364830017, 0.43741971254348755, 0.8586879372596741)),
    },
    {  # under a pen-ink stroke (the artifact layers)
        "spec": {"seed": 7, "artifacts": 6, "origin_x_um": 1000.0, "origin_y_um": 750.0, "width_um": 3000.0,
                 "height_um": 2000.0},
        "region": (1480.0, 1800.0, 128, 128, 1.0),
        "sha": "175eb60e595abfba",
        "nuclei_sha": "7394fd27101da3f3",
        "n_nuclei": 120,
        "first_nucleus": (1474.604206453038, 1905.7116652992434),
        "mean": (0.215763444, 0.389746018, 0.265008882),
        "pixels": ((0.24145959317684174, 0.49908360838890076, 0.2878721058368683),
                   (0.2449067234992981, 0.23991818726062775, 0.2810375988483429)),
    },
    {
        "spec": {"seed": 12345, "pieces": 3, "h_strength": 1.2, "width_um": 4000.0, "height_um": 3000.0},
        "region": (1800.0, 1400.0, 100, 100, 0.3),
        "sha": "1538623972fc7d70",
        "nuclei_sha": "48afb8d9d2a64475",
        "n_nuclei": 35,
        "first_nucleus": (1794.2074340350755, 1419.8060050940517),
        "mean": (0.532672105, 0.361050188, 0.655434625),
        "pixels": ((0.04013952612876892, 0.019719943404197693, 0.22306780517101288),
                   (0.8532121777534485, 0.4804542064666748, 0.8649852871894836)),
    },
]


def _sha(a: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("case", HEAD_RENDERS, ids=lambda c: f"seed{c['spec']['seed']}-{c['region'][0]:.0f}")
def test_slides_without_lesions_render_as_before(case: dict[str, Any]) -> None:
    slide = SyntheticSlide(SlideSpec(**case["spec"]))
    assert slide.lesions is None
    x0, y0, h, w, px = case["region"]
    t = slide.transmittance(x0, y0, h, w, px)
    reach = _NUC_MAX_AXIS_UM * (1 + _NUC_EDGE)
    cx, cy, tumour = slide.nuclei(x0 - reach, y0 - reach, x0 + w * px + reach, y0 + h * px + reach)
    order = np.lexsort((cy, cx))
    # Nucleus centres are float64 arithmetic on hashes: the same on every CPU, bit for bit.
    assert len(cx) == case["n_nuclei"] and not tumour.any()
    assert (float(cx[order][0]), float(cy[order][0])) == case["first_nucleus"]
    assert _sha(np.stack([cx[order], cy[order]])) == case["nuclei_sha"]
    if _sha(t) != case["sha"]:
        # Not bit-identical: allowed only as last-bit float32 differences of another CPU's sin/exp.
        means = [float(t[..., c].astype(np.float64).mean()) for c in range(3)]
        np.testing.assert_allclose(means, case["mean"], atol=2e-6, err_msg="the lesion-free render changed")
        picks = (t[h // 3, w // 2], t[2 * h // 3, w // 4])
        np.testing.assert_allclose(np.array(picks), np.array(case["pixels"]), atol=5e-6,
                                   err_msg="the lesion-free render changed")


def test_spec_keys_and_old_metadata() -> None:
    # Recordings made before lesions existed have no lesion keys: they rebuild a lesion-free slide.
    old = {k: v for k, v in SlideSpec(seed=4).to_dict().items() if k not in ("lesions", "mimics", "lesion_min_um",
                                                                             "lesion_max_um", "vesicular_max")}
    assert SlideSpec.from_dict(old) == SlideSpec(seed=4)
    spec = SlideSpec(seed=4, lesions=2, mimics=1)
    assert SlideSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="lesions and mimics must be >= 0"):
        SlideSpec(lesions=-1)
    with pytest.raises(ValueError, match="lesion_min_um <= lesion_max_um"):
        SlideSpec(lesions=1, lesion_min_um=500.0, lesion_max_um=100.0)
    with pytest.raises(ValueError, match="only on the procedural H&E"):
        SlideSpec(lesions=1, content="ihc")
    with pytest.raises(ValueError, match=r"vesicular_max must be in \[0, 1\], got 1.5"):
        SlideSpec(lesions=1, vesicular_max=1.5)


# ------------------------------------------------------------------ layout


def test_layout_spans_sizes_edges_and_kinds() -> None:
    diameters, cut_by_edge, patterns = [], 0, set()
    for seed in range(12):
        slide = SyntheticSlide(SlideSpec(seed=seed, lesions=6, mimics=2))  # the default 2 x 1.5 cm area
        assert slide.lesions is not None
        les = slide.lesions.lesions
        assert [x.tumour for x in les] == [True] * 6 + [False] * 2
        for i, a in enumerate(les):
            for b in les[i + 1 :]:  # separate objects: one truth polygon each
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.reach + b.reach
            patterns.add(a.pattern)
            if a.tumour:
                diameters.append(2 * a.radius)
                ring = a.outline(128)
                cut_by_edge += bool((slide._piece_mask_pts(ring[:, 0], ring[:, 1]) < 0.5).any())
    assert min(diameters) < 100 and max(diameters) > 2000, "from ~50 µm to several mm"
    assert 0.1 < cut_by_edge / len(diameters) < 0.6, "some lesions reach the tissue edge, most do not"
    assert patterns == {"solid", "nests", "glands", "lymphoid", "hyperplasia"}
    # Same spec, same layout (a pure function of the seed).
    spec = SlideSpec(seed=5, lesions=4, mimics=2)
    assert lesion_layout(spec, SyntheticSlide(spec)._pieces) == SyntheticSlide(spec).lesions.lesions  # type: ignore[union-attr]


def test_held_out_seeds() -> None:
    assert check_training_seed(HELD_OUT_SEEDS.start - 1) == HELD_OUT_SEEDS.start - 1
    with pytest.raises(ValueError, match="held out"):
        check_training_seed(HELD_OUT_SEEDS.start + 17)


# ------------------------------------------------------------------ lesions render like carcinoma

LESION_SPEC = SlideSpec(
    seed=0, origin_x_um=0.0, origin_y_um=0.0, width_um=2400.0, height_um=1600.0, pieces=2,
    lesions=3, mimics=1, lesion_min_um=260.0, lesion_max_um=300.0,
)


def _stains(t: npt.NDArray[np.float32], glass_od: float = 0.02) -> F64:
    """Haematoxylin and eosin amounts per pixel by colour deconvolution (Ruifrok-Johnston)."""
    od = -np.log10(np.clip(t.astype(np.float64), 1e-4, 1.0)) - glass_od
    m = np.array([RUIFROK_H, RUIFROK_E], np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return np.asarray((od.reshape(-1, 3) @ np.linalg.pinv(m)).reshape(*t.shape[:2], 2), np.float64)


@pytest.fixture(scope="module")
def lesion_slide() -> SyntheticSlide:
    return SyntheticSlide(LESION_SPEC)


def _window(slide: SyntheticSlide, index: int, px: float = 0.5) -> dict[str, Any]:
    assert slide.lesions is not None
    les = slide.lesions.lesions[index]
    half = 1.8 * les.radius
    x0, y0, n = les.cx - half, les.cy - half, int(2 * half / px)
    xs = x0 + (np.arange(n) + 0.5) * px
    ys = y0 + (np.arange(n) + 0.5) * px
    layers = slide.lesions.layers(xs, ys)
    assert layers is not None
    tissue = slide._piece_mask_grid(xs, ys) * (1 - slide._holes_grid(xs, ys)) > 0.5
    member = layers.t if les.tumour else layers.mimic
    inside = (member > 0.5) & tissue
    outside = (layers.t == 0) & (layers.mimic == 0) & tissue
    assert inside.sum() > 0.05 * n * n and outside.sum() > 0.2 * n * n
    t = slide.transmittance(x0, y0, n, n, px)
    cx, cy, tumour = slide.nuclei(x0, y0, x0 + n * px, y0 + n * px)
    i, j = ((cy - y0) / px).astype(int), ((cx - x0) / px).astype(int)
    return {"les": les, "t": t, "inside": inside, "outside": outside, "px": px, "in_nuc": inside[i, j],
            "out_nuc": outside[i, j], "tumour": tumour}


@pytest.mark.parametrize("index", [0, 1, 2])
def test_tumour_nuclei_are_crowded_enlarged_and_dark(lesion_slide: SyntheticSlide, index: int) -> None:
    w = _window(lesion_slide, index)
    assert w["les"].tumour
    area_in, area_out = w["inside"].sum() * w["px"] ** 2, w["outside"].sum() * w["px"] ** 2
    # The nucleus layer: more nuclei per tissue area, most of them tumour nuclei, none outside.
    dens_in, dens_out = w["in_nuc"].sum() / area_in, w["out_nuc"].sum() / area_out
    assert dens_in > 1.2 * dens_out, (dens_in, dens_out)
    assert w["tumour"][w["in_nuc"]].mean() > 0.6 and not w["tumour"][w["out_nuc"]].any()
    # The pixels: more of the tissue is nuclear, and nuclear pixels hold more haematoxylin.
    h = _stains(w["t"])[..., 0]
    nuclear = h > 0.6
    assert nuclear[w["inside"]].mean() > 1.4 * nuclear[w["outside"]].mean()
    assert h[nuclear & w["inside"]].mean() > h[nuclear & w["outside"]].mean() + 0.04
    assert h[w["inside"]].mean() > 1.2 * h[w["outside"]].mean()


def test_tumour_nuclei_are_larger_than_benign_ones(lesion_slide: SyntheticSlide) -> None:
    assert lesion_slide.lesions is not None
    for les in lesion_slide.lesions.lesions[:3]:
        r = les.radius
        n = lesion_slide.lesions.nuclei(les.cx - r, les.cy - r, les.cx + r, les.cy + r)
        _, _, a, b, _, _ = lesion_slide._normal_nuclei(les.cx - 3 * r, les.cy - 3 * r, les.cx + 3 * r, les.cy + 3 * r)
        round_ = b / a > 0.74  # benign round nuclei (stroma's spindles are long and thin)
        tumour_area = (n["a"] * n["b"])[n["tumour"] > 0]
        assert tumour_area.size > 50
        assert np.median(tumour_area) > 1.2 * np.median((a * b)[round_]), les
        assert np.std(n["a"][n["tumour"] > 0]) > 0.2, "pleomorphic: nuclear size varies"


def test_vesicular_carcinoma_is_a_look_of_the_same_layout(lesion_slide: SyntheticSlide) -> None:
    ves = SyntheticSlide(replace(LESION_SPEC, vesicular_max=1.0))
    assert ves.lesions is not None and lesion_slide.lesions is not None
    for a, b in zip(lesion_slide.lesions.lesions, ves.lesions.lesions, strict=True):
        # Its own hash stream: where, how large, which pattern and grade are as without it.
        assert replace(b, vesicular=0.0) == a
        assert a.vesicular == 0.0 and (0.0 <= b.vesicular <= 1.0 if b.tumour else b.vesicular == 0.0)
    # Force the first lesion to each end of the look: the vesicular cells are larger and fewer.
    les = ves.lesions.lesions[0]
    r = les.radius
    found = {}
    for v in (0.0, 1.0):
        ves.lesions.lesions[0] = replace(les, vesicular=v)
        found[v] = ves.lesions.nuclei(les.cx - r, les.cy - r, les.cx + r, les.cy + r)
    ves.lesions.lesions[0] = les
    area = {v: np.median((n["a"] * n["b"])[n["tumour"] > 0]) for v, n in found.items()}
    count = {v: int((n["tumour"] > 0).sum()) for v, n in found.items()}
    assert area[1.0] > 2.0 * area[0.0] and count[1.0] < 0.6 * count[0.0], (area, count)
    assert (found[0.0]["vesicular"] == 0).all() and (found[1.0]["vesicular"][found[1.0]["tumour"] > 0] >= 0.7).all()


def test_a_vesicular_nucleus_has_a_pale_interior_a_dark_rim_and_a_nucleolus() -> None:
    px, half = 0.1, 80
    def draw(v: float) -> npt.NDArray[np.float32]:
        canvas = np.zeros((2 * half + 1, 2 * half + 1), np.float32)
        centre = np.array([(half + 0.5) * px])
        one = np.ones(1)
        _draw_nuclei(canvas, 0.0, 0.0, px, half, centre, centre, 6.0 * one, 6.0 * one, np.ones(1, np.float32),
                     0.0 * one, vesicular=v * one, nucleolus=np.array([[1.0, 0.0]]))
        return canvas
    solid, vesicular = draw(0.0), draw(1.0)
    row = vesicular[half]  # along the nucleus's a axis: the nucleolus sits at +0.45 a = +2.7 µm
    # At -1.8 µm (the interior), 4.8-6.2 µm (the rim) and +2.7 µm (the nucleolus):
    interior, rim, nucleolus = row[half - 18], row[half + 48 : half + 62].max(), row[half + 27]
    assert rim > 3 * interior and nucleolus > 3 * interior, (interior, rim, nucleolus)
    assert interior < 0.5 * solid[half, half - 18]  # paler than a solid nucleus's interior
    assert vesicular[half, 2 * half] == 0.0  # nothing beyond the outline (6 µm + its soft edge)


def test_mimics_are_crowded_but_not_tumour(lesion_slide: SyntheticSlide) -> None:
    w = _window(lesion_slide, 3)
    assert not w["les"].tumour
    area_in, area_out = w["inside"].sum() * w["px"] ** 2, w["outside"].sum() * w["px"] ** 2
    assert w["in_nuc"].sum() / area_in > 1.5 * w["out_nuc"].sum() / area_out
    assert not w["tumour"].any()


# ------------------------------------------------------------------ the stroma of a lesion


def _eosin_texture(slide: SyntheticSlide, index: int) -> tuple[float, float, float, float]:
    """High-pass eosin std in the nucleus-free stroma inside lesion ``index`` (full membership, no
    epithelium or lumen) and outside every lesion, and the mean eosin in each."""
    assert slide.lesions is not None
    les = slide.lesions.lesions[index]
    half = 1.3 * les.radius
    n = int(2 * half)
    x0, y0 = les.cx - half, les.cy - half
    xs, ys = x0 + np.arange(n) + 0.5, y0 + np.arange(n) + 0.5
    lay = slide.lesions.layers(xs, ys)
    assert lay is not None
    he = _stains(slide.transmittance(x0, y0, n, n, 1.0))
    h, e = he[..., 0], he[..., 1]
    tissue = slide._piece_mask_grid(xs, ys) * (1 - slide._holes_grid(xs, ys)) > 0.5
    free = cv2.erode((h < 0.35).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    member = np.maximum(lay.t, lay.mimic)
    inside = (member > 0.99) & (lay.epi < 0.01) & (lay.lumen < 0.01) & tissue & free
    outside = (member == 0) & tissue & free
    assert inside.sum() > 500 and outside.sum() > 5000
    hp = e - cv2.GaussianBlur(e, (0, 0), 6)
    return float(hp[inside].std()), float(hp[outside].std()), float(e[inside].mean()), float(e[outside].mean())


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lesion_stroma_loses_the_normal_pattern(lesion_slide: SyntheticSlide, index: int) -> None:
    # Between a lesion's islands and glands the long wavy collagen fibres give way to desmoplastic
    # stroma (short haphazard fibres on a homogeneous ground). Before stop 26 the ordinary stroma
    # showed through: the fine eosin texture was the same inside and out (ratio 0.90-1.0 here).
    assert lesion_slide.lesions is not None
    assert lesion_slide.lesions.stroma_looks[index].strength > 0
    sd_in, sd_out, _, _ = _eosin_texture(lesion_slide, index)
    assert sd_in < 0.7 * sd_out, (sd_in, sd_out)


def test_lesion_stroma_varies_and_mimics_share_it() -> None:
    looks, kinds = [], []
    for seed in range(12):
        slide = SyntheticSlide(SlideSpec(seed=seed, lesions=6, mimics=4))
        assert slide.lesions is not None
        looks += slide.lesions.stroma_looks
        kinds += [les.pattern for les in slide.lesions.lesions]
    tum = [lk for lk, k in zip(looks, kinds, strict=True) if k in ("solid", "nests", "glands")]
    hyp = [lk.strength > 0 for lk, k in zip(looks, kinds, strict=True) if k == "hyperplasia"]
    assert all(lk.strength > 0 for lk in tum)
    assert all(lk.strength == 0 for lk, k in zip(looks, kinds, strict=True) if k == "lymphoid")
    # No single colour: the ground is paler than the ordinary stroma (~0.2) in some lesions and
    # denser in others, and the strength runs from faint to full.
    grounds, strengths = [lk.ground for lk in tum], [lk.strength for lk in tum]
    assert min(grounds) < 0.15 and max(grounds) > 0.26
    assert min(strengths) < 0.45 and max(strengths) > 0.9
    # Hard negatives stay hard: some hyperplasia mimics lie in the same altered stroma, some do not.
    assert 0 < sum(hyp) < len(hyp)


def test_lesion_stroma_is_drawn_only_inside(lesion_slide: SyntheticSlide) -> None:
    # Outside a lesion's membership (a few µm of fibroblast nuclei aside) the pixels are those of
    # the simulator without lesion stroma, bit for bit: a region within the lesion's reach but
    # beyond its outline hashes as the code before stop 26 (commit 5eedd0a) rendered it.
    assert lesion_slide.lesions is not None
    les = lesion_slide.lesions.lesions[1]
    x0, y0, n = les.cx + 0.75 * les.reach, les.cy + 0.75 * les.reach, int(0.25 * les.reach)
    assert n == 40 and lesion_slide.lesions.layers(x0 + np.arange(n) + 0.5, y0 + np.arange(n) + 0.5) is not None
    t = lesion_slide.transmittance(x0, y0, n, n, 1.0)
    if _sha(t) != "13eb75626f73b99e":  # last-bit float32 differences of another CPU's sin/exp only
        means = [float(t[..., c].astype(np.float64).mean()) for c in range(3)]
        np.testing.assert_allclose(means, (0.5965836769237649, 0.379585124089499, 0.7026901749335229), atol=2e-6)
    # And over a whole lesion window: the same slide with its lesion stroma switched off differs only
    # inside (and within 5 µm of) the membership.
    plain = SyntheticSlide(LESION_SPEC)
    assert plain.lesions is not None
    plain.lesions.stroma_looks = [replace(lk, strength=0.0) for lk in plain.lesions.stroma_looks]
    half = les.reach + 20
    m = int(2 * half)
    x0, y0 = les.cx - half, les.cy - half
    a, b = lesion_slide.transmittance(x0, y0, m, m, 1.0), plain.transmittance(x0, y0, m, m, 1.0)
    lay = lesion_slide.lesions.layers(x0 + np.arange(m) + 0.5, y0 + np.arange(m) + 0.5)
    assert lay is not None
    near = cv2.dilate((lay.t > 0).astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
    differ = np.any(a != b, axis=-1)
    assert not differ[~near].any()
    assert differ[(lay.stroma > 0.5) & (lay.epi < 0.01)].mean() > 0.6  # holes and glass (no tissue) aside


# ------------------------------------------------------------------ the GeoJSON truth


@pytest.fixture(scope="module")
def truth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("lesions")
    rec = tmp / "rec.zarr"
    args = ["synth", "--out", str(rec), "--fields", "4", "3", "--tile", "256", "--pixel-size", "0.5",
            "--z-planes", "1", "--seed", "5", "--lesions", "3", "--mimics", "1"]
    assert hw_sim_main(args) == 0
    ann, nuc = tmp / "truth.geojson", tmp / "nuclei.geojson"
    assert hw_sim_main(["truth", str(rec), "--annotations", str(ann), "--nuclei", str(nuc)]) == 0
    both = tmp / "both.geojson"
    assert hw_sim_main(["truth", str(rec), "--annotations", str(both)]) == 0
    return {"rec": rec, "ann": json.loads(ann.read_text()), "nuc": json.loads(nuc.read_text()),
            "both": json.loads(both.read_text()), "meta": Recording.open(rec).meta}


def _shoelace(ring: list[list[float]]) -> float:
    x, y = np.array(ring).T
    return float(0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def test_geojson_is_what_qupath_reads(truth: dict[str, Any]) -> None:
    meta = truth["meta"]
    height, width = mosaic_shape(meta)
    ann = truth["ann"]
    assert ann["type"] == "FeatureCollection"
    tumours = [f for f in ann["features"] if f["properties"]["classification"]["name"] == "Tumor"]
    assert tumours and len(tumours) <= 3
    for f in ann["features"]:
        props = f["properties"]
        assert f["type"] == "Feature" and props["objectType"] == "annotation"
        cls = props["classification"]
        assert cls["name"] in ("Tumor", "Mimic")
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        area_px = 0.0
        for rings in polys:
            for k, ring in enumerate(rings):
                assert len(ring) >= 4 and ring[0] == ring[-1], "closed rings"
                a = _shoelace(ring)
                assert (a > 0) == (k == 0), "exterior counter-clockwise, holes clockwise (RFC 7946)"
                area_px += a
        g = shape(geom)
        assert g.is_valid, shapely.validation.explain_validity(g)
        minx, miny, maxx, maxy = g.bounds
        assert min(minx, miny) >= 0 and maxx <= width and maxy <= height, "inside the mosaic"
        m = props["measurements"]
        assert all(isinstance(v, float | int) for v in m.values())
        area_mm2 = area_px * (meta.pixel_size_um / 1000) ** 2
        assert m["Area mm^2"] > 0 and m["Area mm^2"] == pytest.approx(area_mm2, rel=1e-6)
        diameter_px = m["Max diameter mm"] * 1000 / meta.pixel_size_um
        assert np.sqrt(area_px) < diameter_px <= np.hypot(maxx - minx, maxy - miny) + 1e-6


def test_nuclei_detections_match_the_polygons(truth: dict[str, Any]) -> None:
    feats = truth["nuc"]["features"]
    assert feats and all(f["properties"]["objectType"] == "detection" and f["geometry"]["type"] == "Point"
                         for f in feats)
    assert all(len(f["properties"]["classification"]["color"]) == 3 for f in feats)
    # Without --nuclei the same detections follow the annotations in one file.
    assert truth["both"]["features"] == truth["ann"]["features"] + feats
    tumour_geoms = [shape(f["geometry"]) for f in truth["ann"]["features"]
                    if f["properties"]["classification"]["name"] == "Tumor"]
    # Within the traced tissue edge's tolerance (half a 0.5 µm step, plus its simplification).
    union = shapely.unary_union(tumour_geoms).buffer(1.0 / truth["meta"].pixel_size_um)
    pts = shapely.points([f["geometry"]["coordinates"] for f in feats])
    is_tumour = np.array([f["properties"]["classification"]["name"] == "Tumor" for f in feats])
    inside = shapely.contains(union, pts)
    assert is_tumour.sum() > 20
    assert inside[is_tumour].all(), "every tumour nucleus lies in a tumour polygon"
    height, width = mosaic_shape(truth["meta"])
    coords = np.array([f["geometry"]["coordinates"] for f in feats])
    assert (coords >= 0).all() and (coords[:, 0] < width).all() and (coords[:, 1] < height).all()


def test_polygons_match_the_rendered_truth(truth: dict[str, Any]) -> None:
    meta = truth["meta"]
    height, width = mosaic_shape(meta)
    renderer = TruthRenderer(meta)
    img = np.zeros((height, width, 3), np.uint8)
    for r in range(0, height, renderer.tile):
        for c in range(0, width, renderer.tile):
            block = renderer.render(r, c)
            img[r : r + renderer.tile, c : c + renderer.tile] = block[: height - r, : width - c]
    white = np.asarray(renderer._gain, np.float64) * 10 ** -0.02  # the glass, as the camera records it
    h = _stains(np.clip(img / white, 0, 1).astype(np.float32), glass_od=0.0)[..., 0]
    mask = np.zeros((height, width), np.uint8)
    for f in truth["ann"]["features"]:
        if f["properties"]["classification"]["name"] != "Tumor":
            continue
        geom = f["geometry"]
        for rings in [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]:
            # Exterior filled, holes cleared: pixel centres sit at +0.5 in these coordinates.
            for k, ring in enumerate(rings):
                pts = np.round((np.array(ring) - 0.5) * 16).astype(np.int32)
                cv2.fillPoly(mask, [pts], 1 if k == 0 else 0, shift=4)
    tissue = img.astype(np.float64).sum(-1) < 0.85 * white.sum()
    inside, outside = mask.astype(bool) & tissue, ~mask.astype(bool) & tissue
    assert inside.sum() > 2000
    assert h[inside].mean() > 1.3 * h[outside].mean(), (h[inside].mean(), h[outside].mean())


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["truth", "REC"], "error: truth: give --out (the in-focus image) and/or --annotations"),
        (["truth", "REC", "--nuclei", "n.geojson"], "error: truth: --nuclei goes with --annotations"),
        (["synth", "--out", "OUT", "--lesions", "-2"], "error: lesions and mimics must be >= 0, got -2"),
        (["synth", "--out", "OUT", "--lesions", "2", "--content", "brick"], "error: lesions are drawn only on"),
    ],
)
def test_bad_arguments_say_what_is_wrong(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(tmp_path / a) if a in ("REC", "OUT") else a for a in args]
    assert hw_sim_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()


def test_truth_refuses_one_file_for_both(truth: dict[str, Any], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    same = str(tmp_path / "t.geojson")
    assert hw_sim_main(["truth", str(truth["rec"]), "--annotations", same, "--nuclei", same]) == 2
    assert "is the annotations file itself" in capsys.readouterr().err
