import pytest

from runtime.devices.protocols import ScanArea
from runtime.devices.scan_plan import serpentine_plan


def test_serpentine_covers_area_in_snake_order() -> None:
    area = ScanArea(1000.0, 2000.0, 100.0 + 2 * 90.0, 100.0 + 90.0)
    plan = serpentine_plan(area, 100.0, 100.0, overlap=0.1)
    assert (plan.rows, plan.cols) == (2, 3)
    assert [f.col for f in plan.fields] == [0, 1, 2, 2, 1, 0]
    assert [f.index for f in plan.fields] == list(range(6))
    first = plan.fields[0]
    assert (first.x_um, first.y_um) == (1050.0, 2050.0)
    last_right = max(f.x_um for f in plan.fields) + 50.0
    assert last_right >= area.x_um + area.width_um - 1e-9


def test_single_field_when_area_is_small() -> None:
    plan = serpentine_plan(ScanArea(0, 0, 10, 10), 100.0, 100.0)
    assert (plan.rows, plan.cols) == (1, 1)


@pytest.mark.parametrize("overlap", [-0.1, 0.5, 0.9])
def test_bad_overlap_rejected(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        serpentine_plan(ScanArea(0, 0, 500, 500), 100.0, 100.0, overlap=overlap)


def test_area_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ScanArea(0, 0, 0, 10)
