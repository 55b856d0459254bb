"""The 95% Wilson score interval of the success rates."""

import pytest

from a3t.stats import wilson_interval


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    # (n p + z²/2 ± z sqrt(n p (1 - p) + z²/4)) / (n + z²), z = 1.96, worked out by hand.
    (0, 24, 0.0, 0.137981),
    (6, 24, 0.119992, 0.448998),  # what the campaign table shows as 25.0% [12.0–44.9]
    (12, 24, 0.314271, 0.685729),
    (24, 24, 0.862019, 1.0),
    (1, 12, 0.014865, 0.353886),
])
def test_known_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-6)


def test_no_trials_know_nothing():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_symmetric_narrower_with_more_trials_and_wider_with_z():
    low, high = wilson_interval(3, 10)
    assert wilson_interval(7, 10) == pytest.approx((1 - high, 1 - low))
    assert wilson_interval(30, 100)[1] - wilson_interval(30, 100)[0] < high - low
    assert wilson_interval(3, 10, z=2.58)[0] < low  # 99% is wider than 95%
    assert 0.0 <= wilson_interval(0, 1)[0] and wilson_interval(1, 1)[1] <= 1.0


def test_more_successes_than_trials_is_an_error():
    with pytest.raises(ValueError, match="5 successes out of 4"):
        wilson_interval(5, 4)
