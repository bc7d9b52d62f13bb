import pytest

from itscale.core import Always, ESSBelow, EveryK, Never, get_schedule


def test_schedule_decisions():
    assert Always()(1, 1.0) and not Never()(1, 0.0)
    assert ESSBelow(0.5)(3, 0.49) and not ESSBelow(0.5)(3, 0.5)
    assert [EveryK(3)(t, 1.0) for t in range(1, 7)] == [False, False, True, False, False, True]


@pytest.mark.parametrize("spec, expected", [
    ("always", Always()), ("never", Never()), ("ess:0.3", ESSBelow(0.3)), ("ess", ESSBelow(0.5)),
    ("every:2", EveryK(2)),
])
def test_get_schedule_parses_names(spec, expected):
    assert get_schedule(spec) == expected
    assert get_schedule(expected) is expected


@pytest.mark.parametrize("spec, match", [
    ("sometimes", "unknown schedule"), ("ess:1.5", "threshold"), ("ess:x", "bad schedule"),
    ("every:0", "EveryK.k"), ("always:1", "unknown schedule"), (3, "must be a string"),
])
def test_bad_schedules_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(spec)
