"""The one retry policy."""

from __future__ import annotations

import threading

import pytest

from param_server.core.backoff import Backoff


def test_grows_to_the_cap_and_starts_over_on_reset() -> None:
    b = Backoff(0.05, 0.3)
    assert [b.next() for _ in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    b.reset()
    assert b.next() == 0.05


def test_jitter_stays_within_half_to_one_and_a_half() -> None:
    b = Backoff(1.0, 1.0, jitter=True)
    delays = [b.next() for _ in range(200)]
    assert all(0.5 <= d < 1.5 for d in delays)
    assert len(set(delays)) > 1


def test_sleep_returns_early_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    assert Backoff(60.0, 60.0).sleep(stop) is True


@pytest.mark.parametrize(
    ("initial", "maximum", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)]
)
def test_nonsense_is_refused(initial: float, maximum: float, factor: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(initial, maximum, factor=factor)
