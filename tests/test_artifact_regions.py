"""The scanner's artifact regions (runtime.analysis.artifact_regions): classifier windows after the
scan-end context, placed on the slide and merged into QuPath annotations (``artifacts.geojson``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.analysis import geojson
from runtime.analysis.artifact_regions import ARTIFACTS_NAME, FieldArtifacts, artifact_features, write_artifact_regions

TILE = (512, 512)  # 2 x 2 windows of 256 px


def _field(top: tuple[float, float], flagged: set[tuple[int, int]], by_model: set[tuple[int, int]]) -> FieldArtifacts:
    p = [[0.9 if (i, j) in by_model else 0.3 for j in range(2)] for i in range(2)]
    return FieldArtifacts(top, TILE, (2, 2), frozenset(flagged), frozenset(by_model), p)


def test_windows_of_neighbouring_fields_merge_into_one_region_with_its_measurements() -> None:
    """Field A's right column (x 256-512) and field B's left column (B starts 460 px to the right,
    52 px of overlap: x 460-716) are one region 460 px wide and 512 px high; a window of field C
    far below is a second, smaller region."""
    a = _field((0.0, 0.0), {(0, 1), (1, 1)}, {(0, 1)})
    b = _field((0.0, 460.0), {(0, 0), (1, 0)}, set())
    c = _field((2000.0, 0.0), {(1, 1)}, {(1, 1)})
    feats = artifact_features([a, b, c], pixel_size_um=0.25)
    assert geojson.validate({"type": "FeatureCollection", "features": feats}) == []
    assert len(feats) == 2
    big, small = (f["properties"] for f in feats)
    assert big["classification"]["name"] == "Artifact" and big["name"] == "artifact (scanner)"
    m = big["measurements"]
    assert m["Area mm^2"] == pytest.approx(460 * 512 * 0.25**2 / 1e6)
    assert m["Windows"] == 4 and m["Windows flagged by the classifier"] == 1 and m["Max p(artifact)"] == 0.9
    xs = [x for x, _ in feats[0]["geometry"]["coordinates"][0]]
    ys = [y for _, y in feats[0]["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (256.0, 716.0, 0.0, 512.0)
    assert small["measurements"]["Windows"] == 1 and small["measurements"]["Area mm^2"] == pytest.approx(
        256 * 256 * 0.25**2 / 1e6
    )


def test_a_field_without_windows_is_its_whole_tile() -> None:
    """A journal written before windows were carried: the context ran over fields."""
    ctx = {"artifact_in_context": True, "artifact_windows_in_context": None}
    f = FieldArtifacts.in_context((100.0, 50.0), TILE, ctx, None, None)
    assert f.grid is None and f.boxes() == [((0, 0), (50.0, 100.0, 562.0, 612.0))]
    feats = artifact_features([f], 0.5)
    assert feats[0]["properties"]["measurements"]["Windows"] == 1
    assert "Max p(artifact)" not in feats[0]["properties"]["measurements"]


def test_in_context_reads_the_report_entry_and_the_models_own_flags() -> None:
    ctx = {"artifact_in_context": True, "artifact_windows_in_context": [[0, 0], [1, 1]]}
    f = FieldArtifacts.in_context((0.0, 0.0), TILE, ctx, ((True, False), (False, False)), ((0.8, 0.1), (0.2, 0.4)))
    assert f.grid == (2, 2) and f.flagged == {(0, 0), (1, 1)} and f.by_model == {(0, 0)}
    assert f.p_artifact((1, 1)) == 0.4
    # Two windows touching at a corner only: two regions.
    assert len(artifact_features([f], 0.25)) == 2


def test_no_region_writes_no_file_and_removes_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / ARTIFACTS_NAME
    path.write_text("stale")
    assert write_artifact_regions(tmp_path, [], 0.25) == 0 and not path.exists()
    assert write_artifact_regions(tmp_path, [_field((0.0, 0.0), {(0, 0)}, {(0, 0)})], 0.25) == 1
    assert geojson.check_file(path) == 1
    assert json.loads(path.read_text())["features"][0]["id"] == "scanner-artifact-0"
