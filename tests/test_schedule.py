import pytest

from dream3d.guidance.schedule import check_schedule, evaluate


def test_constant_and_ramps():
    assert evaluate(0.5, 100) == 0.5
    assert evaluate([10, 0.0, 1.0, 20], 5) == 0.0
    assert evaluate([10, 0.0, 1.0, 20], 15) == pytest.approx(0.5)
    assert evaluate([10, 0.0, 1.0, 20], 99) == 1.0
    assert evaluate([2.0, 4.0, 10], 5) == pytest.approx(3.0)
    assert evaluate([5000, 0.98, 0.5, 5001], 5001) == 0.5


def test_piecewise():
    s = [[0, 1.0], [10, 3.0], [20, 0.0]]
    assert evaluate(s, 5) == pytest.approx(2.0)
    assert evaluate(s, 15) == pytest.approx(1.5)
    assert evaluate(s, 30) == 0.0


@pytest.mark.parametrize("bad", [[], [1, 2], [5, 0.0, 1.0, 2], [[0, 1], [0]], "x"])
def test_bad_schedules(bad):
    with pytest.raises(ValueError):
        check_schedule(bad)
