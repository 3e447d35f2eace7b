"""The position solver: weighted least squares with loop closure, the stage model, final tiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from runtime.config import StitchConfig
from runtime.devices.protocols import ScanArea
from runtime.devices.scan_plan import serpentine_plan
from runtime.output.mosaic_store import MosaicStore
from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry, Replay
from runtime.stitching.positions import Link, PositionSolver, StageModel

STEP = 900.0


def _grid(rows: int, cols: int) -> list[tuple[int, int]]:
    """Serpentine order."""
    return [(r, c) for r in range(rows) for c in (range(cols) if r % 2 == 0 else range(cols - 1, -1, -1))]


def _batch(truth: dict, links: list[Link], prior: dict, sigma_prior: float) -> dict:
    """The full weighted least-squares solution, dense, as a reference."""
    keys = sorted(truth)
    idx = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    out = {}
    sol = np.empty((n, 2))
    for axis in range(2):
        rows, rhs, w = [], [], []
        for k in keys:
            e = np.zeros(n)
            e[idx[k]] = 1
            rows.append(e)
            rhs.append(prior[k][axis])
            w.append(1 / sigma_prior)
        for lk in links:
            e = np.zeros(n)
            e[idx[lk.b]], e[idx[lk.a]] = 1, -1
            rows.append(e)
            rhs.append(lk.shift[axis])
            w.append(1 / lk.sigma[axis])
        a = np.array(rows) * np.array(w)[:, None]
        sol[:, axis] = np.linalg.lstsq(a, np.array(rhs) * np.array(w), rcond=None)[0]
    for k in keys:
        out[k] = tuple(sol[idx[k]])
    return out


def test_window_equals_batch_least_squares_and_closes_loops() -> None:
    """With every tile pending, the window solve is the batch WLS; an inconsistent loop is shared out."""
    rng = np.random.default_rng(0)
    keys = _grid(3, 3)
    cmd = {k: (k[0] * STEP, k[1] * STEP) for k in keys}
    truth = {k: (cmd[k][0] + rng.normal(0, 10), cmd[k][1] + rng.normal(0, 10)) for k in keys}
    links = []
    for r, c in keys:
        for nb in ((r, c + 1), (r + 1, c)):
            if nb in truth:
                d = np.subtract(truth[nb], truth[(r, c)]) + rng.normal(0, 0.05, 2)
                links.append(Link((r, c), nb, (float(d[0]), float(d[1])), (0.05, 0.05)))
    # One pair measured 1 px off: loop closure must spread it, not hand it down a path.
    bad = links[0]
    links[0] = Link(bad.a, bad.b, (bad.shift[0] + 1.0, bad.shift[1]), bad.sigma)
    solver = PositionSolver(10.0)
    for k in keys:
        solver.add_tile(k, cmd[k])
    for lk in links:
        solver.add_link(lk)
    solver.solve()
    ref = _batch(truth, links, cmd, 10.0)
    for k in keys:
        assert solver.position(k) == pytest.approx(ref[k], abs=1e-6)
    # The bad pair's 1 px error is shared by the loops through it: it is fit to much less than 1 px.
    d = np.subtract(solver.position(bad.b), solver.position(bad.a))[0] - (bad.shift[0] + 1.0)
    assert 0.3 < abs(d) < 0.8


def test_final_tiles_do_not_move_and_new_tiles_follow_them() -> None:
    solver = PositionSolver(10.0)
    solver.add_tile("a", (0.0, 0.0))
    solver.add_tile("b", (0.0, STEP))
    solver.add_link(Link("a", "b", (3.0, STEP + 5.0), (0.01, 0.01)))
    solver.solve()
    solver.fix(["a"])
    pa = solver.position("a")
    solver.add_tile("c", (0.0, 2 * STEP))
    solver.add_link(Link("b", "c", (-1.0, STEP - 2.0), (0.01, 0.01)))
    solver.solve()
    assert solver.position("a") == pa
    assert solver.position("c")[1] == pytest.approx(pa[1] + 2 * STEP + 3.0, abs=1e-3)
    assert solver.position("c")[0] == pytest.approx(pa[0] + 2.0, abs=1e-3)


def test_link_to_a_tile_fixed_on_its_prior_weighs_like_a_prior() -> None:
    """A glass tile finalised where the stage said must not drag a registered tile off its chain."""
    solver = PositionSolver(10.0)
    for k, c in (("origin", (0.0, 0.0)), ("left", (STEP, 0.0)), ("glass", (0.0, STEP))):
        solver.add_tile(k, c)
    solver.add_link(Link("origin", "left", (STEP + 1.0, 0.0), (0.01, 0.01)))
    solver.solve()
    solver.fix(["origin", "left", "glass"])  # 'left' is registered, 'glass' sits on its prior
    solver.add_tile("new", (STEP, STEP))
    # Registered to 'left' it is 7 px right of commanded; registered to 'glass', 12 px further.
    pl, pg = solver.position("left"), solver.position("glass")
    solver.add_link(Link("left", "new", (0.0, STEP + 7.0 - pl[1]), (0.01, 0.01)))
    solver.add_link(Link("glass", "new", (STEP - pg[0] + pl[0], STEP + 19.0 - pg[1]), (0.01, 0.01)))
    solver.solve()
    assert solver.position("new")[1] == pytest.approx(STEP + 7.0, abs=0.05)


def test_groundedness_follows_links_to_final_tiles() -> None:
    solver = PositionSolver(10.0)
    for k in ("a", "b", "c"):
        solver.add_tile(k, (0.0, 0.0))
    solver.add_link(Link("a", "b", (0.0, 1.0), (0.1, 0.1)))
    assert not solver.grounded("a") and not solver.grounded("b")
    assert solver.island("a") == solver.island("b") != solver.island("c")
    solver.solve()
    solver.fix(["a"])
    assert solver.grounded("b") and not solver.grounded("c")
    solver.add_link(Link("b", "c", (0.0, 1.0), (0.1, 0.1)))
    assert solver.grounded("c") and solver.island("c") == solver.island("a")


def test_unregistered_tile_sits_on_the_stage_model() -> None:
    solver = PositionSolver(10.0)
    solver.add_tile("lonely", (100.0, 200.0))
    solver.solve()
    assert solver.position("lonely") == pytest.approx((100.0, 200.0))


@pytest.mark.parametrize(("angle", "scale"), [(0.3, 1.0), (-0.4, 0.996), (0.0, 1.003)])
def test_stage_model_recovers_rotation_and_scale(angle: float, scale: float) -> None:
    """Registered positions of a rotated camera / mis-scaled stage, with 10 px stage noise."""
    rng = np.random.default_rng(1)
    th = math.radians(angle)
    a = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    model = StageModel(10.0)
    for r in range(6):
        for c in range(8):
            cmd = np.array([r * STEP, c * STEP])
            pos = a @ cmd + np.array([5.0, -3.0]) + rng.normal(0, 10, 2)
            model.add((float(cmd[0]), float(cmd[1])), (float(pos[0]), float(pos[1])))
    assert model.rotation_deg == pytest.approx(angle, abs=0.05)
    assert model.scale[1] == pytest.approx(scale, abs=0.0015)
    # The prediction error at the far corner is the stage noise, not the model's.
    far = np.array([5 * STEP, 7 * STEP])
    assert np.hypot(*(np.array(model.predict((far[0], far[1]))) - (a @ far + [5.0, -3.0]))) < 15


def test_stage_model_is_the_identity_until_told_otherwise() -> None:
    model = StageModel(10.0)
    assert model.predict((10.0, 20.0)) == pytest.approx((10.0, 20.0))
    assert model.rotation_deg == 0.0 and model.scale == (1.0, 1.0)


def test_errors() -> None:
    with pytest.raises(ValueError):
        PositionSolver(0.0)
    solver = PositionSolver(1.0)
    solver.add_tile("a", (0.0, 0.0))
    with pytest.raises(ValueError):
        solver.add_tile("a", (0.0, 0.0))
    with pytest.raises(KeyError):
        solver.add_link(Link("a", "nope", (0.0, 0.0), (1.0, 1.0)))
    with pytest.raises(KeyError):
        solver.fix(["nope"])


def test_islands_joined_by_a_later_row_are_placed_as_one(tmp_path: Path) -> None:
    """Rows 0-1 show two pieces of tissue with glass between them (no link across); row 2 joins them.

    Each piece alone sits on the stage prior, so two pieces made final on their own disagree by
    the stage error; a later row linked to both would carry that misclosure as a shear. The
    accumulator holds the second piece until the row that joins it arrives: every registered
    neighbour pair then agrees with the truth. The accumulator runs on journaled arrivals (links
    and strip content, no pixels), the way a resumed scan replays them.
    """
    rows, cols, px, tile = 4, 6, 0.25, 256
    field_um = tile * px
    area = ScanArea(0.0, 0.0, field_um * (1 + 0.9 * (cols - 1)), field_um * (1 + 0.9 * (rows - 1)))
    plan = serpentine_plan(area, field_um, field_um)
    assert (plan.rows, plan.cols) == (rows, cols)
    geometry = MosaicGeometry(plan, tile, tile, px)
    h, w = geometry.shape
    store = MosaicStore.create(tmp_path / "m.zarr", h, w, chunk=128, pixel_size_um=px)
    acc = DequeAccumulator(geometry, store, StitchConfig(stage_sigma_um=2.5, flatfield=False))
    acc.resume_at(h)  # every row "on disk": the tiles need no pixels
    rng = np.random.default_rng(5)
    truth = {
        (f.row, f.col): tuple(np.add(geometry.commanded_top_left(f), rng.normal(0.0, 10.0, 2))) for f in plan.fields
    }

    def glass_between(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] == b[0] and a[0] <= 1 and {a[1], b[1]} == {2, 3}

    links = []
    for f in plan.fields:
        key = (f.row, f.col)
        prev = (f.row, f.col - 1) if f.row % 2 == 0 else (f.row, f.col + 1)
        nxt = (f.row, f.col + 1) if f.row % 2 == 0 else (f.row, f.col - 1)
        mine = []
        for nb in (prev, (f.row - 1, f.col)):
            if nb in truth and not glass_between(nb, key):
                d = np.subtract(truth[key], truth[nb])
                mine.append(Link(nb, key, (float(d[0]), float(d[1])), (0.01, 0.01)))
        links += mine
        content = (not glass_between(key, nxt), f.row < rows - 1)
        acc.add(f, None, Replay(tuple(mine), content))
    acc.finish()
    for lk in links:
        solved = np.subtract(acc.solver.position(lk.b), acc.solver.position(lk.a))
        assert solved == pytest.approx(lk.shift, abs=0.02), (lk.a, lk.b)


def test_stage_model_predicts_many_points_as_one_at_a_time() -> None:
    """``predict_many`` (the accumulator's reach, every tile) gives ``predict``'s positions, before and after tiles."""
    model = StageModel(10.0)
    pts = np.array([[0.0, 0.0], [512.5, -30.25], [1800.0, 14000.0]])
    assert np.array_equal(model.predict_many(pts), pts)  # no tile yet: where commanded
    rng = np.random.default_rng(4)
    th = math.radians(0.3)
    for k in range(12):
        c = np.array([900.0 * (k // 4), 900.0 * (k % 4)])
        p = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]) @ c * 1.002 + rng.normal(0, 1, 2)
        model.add((float(c[0]), float(c[1])), (float(p[0]), float(p[1])))
    one = np.array([model.predict((float(y), float(x))) for y, x in pts])
    np.testing.assert_allclose(model.predict_many(pts), one, rtol=0, atol=1e-9)


def test_solving_again_without_a_change_gives_the_same_and_any_change_is_solved() -> None:
    """solve() skips the work when nothing changed since the last one (the accumulator solves twice per
    tile): every step of a scan against a solver that always solves."""
    rng = np.random.default_rng(3)
    keys = _grid(3, 4)
    cmd = {k: (k[0] * STEP, k[1] * STEP) for k in keys}
    truth = {k: (cmd[k][0] + rng.normal(0, 8), cmd[k][1] + rng.normal(0, 8)) for k in keys}
    lazy, eager = PositionSolver(10.0), PositionSolver(10.0)

    def solve_both() -> None:
        lazy.solve()
        eager._solved = False
        eager.solve()
        for k in eager.pending:
            assert lazy.position(k) == eager.position(k)

    seen: list[tuple[int, int]] = []
    for n, k in enumerate(keys):
        for s in (lazy, eager):
            s.add_tile(k, cmd[k])
        solve_both()
        for nb in ((k[0], k[1] - 1), (k[0], k[1] + 1), (k[0] - 1, k[1])):
            if nb in seen:
                d = (truth[k][0] - truth[nb][0] + rng.normal(0, 0.05), truth[k][1] - truth[nb][1])
                for s in (lazy, eager):
                    s.add_link(Link(nb, k, d, (0.05, 0.05)))
                solve_both()
        seen.append(k)
        solve_both()
        if n % 3 == 2:
            done = lazy.pending[:2]
            for s in (lazy, eager):
                s.fix(done)
            solve_both()
    assert lazy.pending and all(lazy.position(k) == eager.position(k) for k in keys)
