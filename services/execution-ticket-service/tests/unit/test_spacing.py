"""Spacing of the audit relay's claims and the event-log reader's reads (pure part)."""

from __future__ import annotations

import pytest

from execution_ticket_service.signals import spaced_delay


@pytest.mark.parametrize(
    ("now", "last_claim", "expected"),
    [
        (10.0, 9.0, 0.0),  # after a quiet spell: at once
        (10.0, 9.95, 0.1),  # soon after a claim: the rest of the window
        (10.0, 10.0, 0.15),  # right after a claim that found little: the whole window
        (10.0, 9.7, 0.0),  # the round itself outlasted the window: no window on top
    ],
)
def test_claims_are_spaced_by_the_window(now: float, last_claim: float, expected: float) -> None:
    assert spaced_delay(now=now, last=last_claim, gap=0.15) == pytest.approx(expected)


def test_no_window_means_no_wait() -> None:
    assert spaced_delay(now=10.0, last=10.0, gap=0.0) == 0.0
