"""bench classifier --scan: each field's windows placed on the slide and labelled as the layout bench labels them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from bench.classifier_scan import KINDS, scan_windows, score, window_boxes


@dataclass(frozen=True)
class Box:
    kind: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2

    @property
    def reach(self) -> float:
        return float(((self.x1 - self.x0) ** 2 + (self.y1 - self.y0) ** 2) ** 0.5 / 2)


class BoxSlide:
    """Tissue everywhere; artifacts are axis-aligned rectangles (µm)."""

    def __init__(self, *boxes: Box) -> None:
        self.artifacts: list[Any] = list(boxes)

    def artifact_fraction(self, x0: float, y0: float, height_px: int, width_px: int, px: float) -> float:
        x1, y1 = x0 + width_px * px, y0 + height_px * px
        cover = 0.0
        for b in self.artifacts:
            cover += max(0.0, min(x1, b.x1) - max(x0, b.x0)) * max(0.0, min(y1, b.y1) - max(y0, b.y0))
        return min(cover / ((x1 - x0) * (y1 - y0)), 1.0)

    def tissue_fraction(self, x0: float, y0: float, height_px: int, width_px: int, px: float) -> float:
        return 1.0


def test_window_boxes_cut_the_tile_rows_down_y_and_columns_along_x() -> None:
    # A field centred at (100, 200) µm, 512 px wide and 256 px high at 0.25 µm: 128 x 64 µm, 1 x 2 windows.
    boxes = window_boxes((100.0, 200.0), (256, 512), 0.25, (1, 2))
    assert boxes == {(0, 0): (36.0, 168.0, 64.0, 64.0), (0, 1): (100.0, 168.0, 64.0, 64.0)}
    b = window_boxes((100.0, 200.0), (512, 512), 0.25, (2, 2))
    assert b[(0, 1)] == (100.0, 136.0, 64.0, 64.0) and b[(1, 0)] == (36.0, 200.0, 64.0, 64.0)


def _field(row: int, col: int, x: float, y: float, flags: list[list[bool]], ctx: list[list[int]]) -> dict[str, Any]:
    return {"row": row, "col": col, "x_um": x, "y_um": y, "window_artifact": flags, "artifact_windows_in_context": ctx}


def test_scan_windows_label_each_window_where_its_field_was_commanded() -> None:
    # 3 x 3 fields of 128 µm at a 115.2 µm step (10% overlap), centres from (64, 64). A bubble box
    # covering the top-right window of the middle field (x 179.2..243.2, y 115.2..179.2) and nothing
    # of its other windows; a fold box in the bottom-left field's bottom-left window.
    step = 115.2
    bubble = Box("bubble", 190.0, 120.0, 240.0, 170.0)
    fold = Box("fold", 2.0, 2 * step + 70.0, 20.0, 2 * step + 120.0)
    slide = BoxSlide(bubble, fold)
    off = [[False, False], [False, False]]
    fields = [_field(r, c, 64 + c * step, 64 + r * step, off, []) for r in range(3) for c in range(3)]
    fields[4] = _field(1, 1, 64 + step, 64 + step, off, [[0, 1]])  # the model missed it, context found it
    fields[6] = _field(2, 0, 64, 64 + 2 * step, [[False, False], [True, False]], [[1, 0]])
    windows, moved = scan_windows({"fields": fields}, slide, (512, 512), 0.25)
    assert len(windows) == 36 and moved == 0
    art = {(w.field, w.cell): KINDS[w.kind] for w in windows if w.label == 2}
    # The bubble also reaches into the overlapping windows of the fields right of and above the middle one.
    assert art[((1, 1), (0, 1))] == "bubble" and art[((2, 0), (1, 0))] == "fold"
    assert ((1, 1), (0, 0)) not in art and ((1, 1), (1, 1)) not in art and ((1, 1), (1, 0)) not in art
    assert art[((1, 2), (0, 0))] == "bubble" and art[((0, 1), (1, 1))] == "bubble"  # x from 230.4; y to 128
    assert all(w.label == 1 for w in windows if (w.field, w.cell) not in art)
    assert [w.field for w in windows if w.inner] == [(1, 1)] * 4
    model, ctx = score(windows, "model"), score(windows, "context")
    n_art = len(art)
    assert model["artifacts"] == ctx["artifacts"] == n_art
    assert model["recall_by_kind"]["fold"] == 1.0 and model["recall_by_kind"]["bubble"] == 0.0
    assert ctx["recall_by_kind"]["bubble"] == pytest.approx(1 / (n_art - 1))
    assert model["tissue_called_artifact"] == 0.0 and model["tissue"] == 36 - n_art
    inner = score([w for w in windows if w.inner], "context")
    assert inner["artifact_recall"] == 1.0 and inner["artifacts"] == 1 and inner["recall_by_kind"]["ink"] is None
    # At the stage's true positions (every field 64 µm right of where it was commanded) labels change.
    true_xy = [(f["x_um"] + 64.0, f["y_um"]) for f in fields]
    assert scan_windows({"fields": fields}, slide, (512, 512), 0.25, true_xy)[1] > 0
    # Within the scanned area (0..358.4 µm): the bubble's reach is, the fold's (at x 2..20) is not.
    windows, _ = scan_windows({"fields": fields}, slide, (512, 512), 0.25, area_um=(0.0, 0.0, 358.4, 358.4))
    whole = {KINDS[w.kind]: w.whole for w in windows if w.label == 2}
    assert whole == {"bubble": True, "fold": False} and all(w.whole is None for w in windows if w.label != 2)


def test_scan_windows_refuse_a_report_without_window_flags() -> None:
    with pytest.raises(ValueError, match="no window flags"):
        scan_windows({"fields": [_field(0, 0, 64, 64, [], [])]}, BoxSlide(), (512, 512), 0.25)


def test_the_in_focus_rules_are_scored_on_the_same_windows() -> None:
    slide = BoxSlide(Box("dust", 10.0, 10.0, 50.0, 50.0))  # field (0, 0)'s window (0, 0) only
    off = [[False, False], [False, False]]
    fields = [_field(0, c, 64 + c * 115.2, 64, off, []) for c in range(2)]
    offline = {(0, 0): ([[True, False], [False, False]], frozenset({(0, 0), (0, 1)})), (0, 1): (off, frozenset())}
    windows, _ = scan_windows({"fields": fields}, slide, (512, 512), 0.25, offline=offline)
    assert score(windows, "model")["artifact_recall"] == 0.0
    s = score(windows, "focus_model")
    assert s["artifact_recall"] == 1.0 and s["recall_by_kind"]["dust"] == 1.0 and s["tissue_called_artifact"] == 0.0
    assert score(windows, "focus_context")["tissue_called_artifact"] == 1 / 7
    with pytest.raises(ValueError, match="rule must be one of"):
        score(windows, "fields")


def test_the_recording_bootstrap_spans_what_the_recordings_disagree_on() -> None:
    from bench.classifier_scan import Window, bootstrap

    def art(hit: bool) -> Window:
        return Window((1, 1), (0, 0), (0.0, 0.0, 64.0, 64.0), 2, 1, 0.5, hit, hit, True)

    tissue = Window((1, 1), (0, 1), (64.0, 0.0, 64.0, 64.0), 1, -1, 0.0, False, False, True)
    same = bootstrap([[art(True), tissue], [art(True), tissue]], "model")
    assert same["artifact_recall_90"] == [1.0, 1.0] and same["tissue_called_artifact_90"] == [0.0, 0.0]
    split = bootstrap([[art(True)] * 3, [art(False)] * 3], "context")
    assert split["artifact_recall_90"] == [0.0, 1.0]
    assert score([art(True), art(False), tissue], "model")["kind_balanced_recall"] == 0.5
