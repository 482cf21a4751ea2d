"""Progress reporting: a log line with rate and ETA when there is no terminal."""

import logging

import pytest

from gemb.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_log_mode_reports_rate_and_eta_at_intervals(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="gemb.progress")
    with Progress(1000, "encode documents", unit="text", mode="log", log_every_seconds=30,
                  clock=clock) as progress:
        clock.now += 10
        progress.update(100)  # 10 s in: too early for a line
        assert not caplog.records
        clock.now += 30
        progress.update(100)  # 40 s, 200 done: 5 texts/s, 800 left -> 160 s
        clock.now += 60
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "encode documents: 200/1,000 texts (20.0%), 5.0 texts/s, ETA 2m40s"
    # Leaving a long loop says how it ended.
    assert lines[-1].endswith("(done in 1m40s)") and "200/1,000" in lines[-1]


def test_short_loops_and_off_mode_stay_quiet(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="gemb.progress")
    with Progress(10, "quick", mode="log", clock=clock) as progress:
        clock.now += 5
        progress.update(10)
    with Progress(10, "silent", mode="off", clock=clock) as progress:
        clock.now += 100
        progress.update(10)
    assert not caplog.records


def test_bad_mode_and_durations():
    with pytest.raises(ValueError, match="'bar', 'log' or 'off'"):
        Progress(1, "x", mode="loud")
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(-3) == "0m00s"
