"""utils.log.Progress, the one progress line (training log lines, video frames, the centroid build), on a clock
the test moves by hand."""
from __future__ import annotations

import io
import time

import pytest

from utils.log import Progress


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_log_lines_count_this_runs_work_only(clock):
    lines: list[str] = []
    bar = Progress(100, 10, lines.append)  # resumed at iteration 10
    clock(5.0)
    bar.update(20, {"loss": 1.5, "lr": 0.01})  # 10 iterations in 5 s: 2 it/s, 80 to go: 40 s
    clock(5.0)
    bar.update(30)
    assert lines == [
        "[####................] 20/100  loss 1.5  lr 0.01  2.00 it/s  eta 00:00:40",
        "[######..............] 30/100  2.00 it/s  eta 00:00:35",
    ]


def test_stream_line_is_rewritten_at_most_every_interval_and_ended_by_final(clock):
    out = io.StringIO()
    bar = Progress(10, stream=out, unit="frames", label="video", interval=0.5)
    clock(0.1)
    bar.update(1)  # within the interval: nothing written
    assert out.getvalue() == ""
    clock(0.9)
    bar.update(3)  # 3 frames in 1 s, 7 to go
    clock(0.1)
    bar.update(4)
    clock(1.0)
    bar.update(10, final=True)  # 10 frames in 2.1 s
    assert out.getvalue() == (
        "\rvideo [######..............] 3/10 frames  3.00 frames/s  eta 00:00:02"
        "\rvideo [####################] 10/10 frames  4.76 frames/s  eta 00:00:00\n"
    )


def test_unknown_total_shows_count_and_rate_only(clock):
    out = io.StringIO()
    bar = Progress(0, stream=out, unit="frames")
    clock(2.0)
    bar.update(5, final=True)
    assert out.getvalue() == "\r5 frames  2.50 frames/s\n"


def test_eta_beyond_a_day_and_unknown_eta(clock):
    lines: list[str] = []
    bar = Progress(10**6, log=lines.append)
    bar.update(0)  # no time has passed: no rate, no ETA
    clock(1.0)
    bar.update(1)  # 999999 s to go
    assert lines[0].endswith("0/1000000  0.00 it/s  eta --:--:--")
    assert lines[1].endswith("1/1000000  1.00 it/s  eta 277:46:39")
