"""Console lines and step timing (with a fake clock: timings never depend on this machine)."""

from __future__ import annotations

import math

import pytest

from ling_jax.train.console import (
    StepTimer,
    format_duration,
    format_eval_line,
    format_rate,
    format_train_line,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "seconds, text",
    [(0.4, "0s"), (45, "45s"), (250, "4m10s"), (3600, "1h00m"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0])
def test_format_duration_unknown(seconds):
    assert format_duration(seconds) == "?"


@pytest.mark.parametrize(
    "value, text", [(950, "950"), (41_234, "41.2k"), (3_104_000, "3.1M"), (1.2e9, "1.2G")]
)
def test_format_rate(value, text):
    assert format_rate(value) == text


def test_train_line():
    line = format_train_line(120, 300, 3.81249, 41_234.0, 0.1234, 250.0)
    assert line == "step 120/300 | loss 3.812 | 41.2k tok/s | MFU 12.3% | ETA 4m10s"


def test_train_line_leaves_out_what_was_not_measured():
    assert format_train_line(1, 300, 5.0) == "step 1/300 | loss 5.000"
    assert format_train_line(2, 300, 5.0, 1000.0, math.nan, math.nan) == (
        "step 2/300 | loss 5.000 | 1k tok/s | ETA ?"
    )


def test_eval_lines_are_short():
    metrics = {
        "eval/loss": 3.9012,
        "eval/bits_per_byte": 1.2345,
        "eval/accuracy": 0.41234,
        "eval/mtp_loss": 4.1,
    }
    assert format_eval_line(120, metrics) == (
        "eval step 120 | loss 3.901 | 1.234 bits/byte | acc 41.2%"
    )
    merged = {"eval/merged_loss": 3.5, "eval/merged_accuracy": 0.5}
    assert (
        format_eval_line(8, merged, "eval/merged_") == "merged eval step 8 | loss 3.500 | acc 50.0%"
    )


def test_first_window_excludes_compile_and_counts_finished_steps():
    clock = FakeClock()
    timer = StepTimer(clock)
    clock.now = 100.0  # Step 1 (compile included) finished after 100 s.
    timer.start(1)
    clock.now = 109.0  # Steps 2..10 finished 9 s later.
    window = timer.window(10, 100)
    assert (window.steps, window.seconds, window.steps_per_sec) == (9, 9.0, 1.0)
    assert window.eta_seconds == pytest.approx(90.0)  # 90 steps left at 1 step/s
    clock.now = 129.0
    window = timer.window(20, 100)
    assert (window.steps, window.seconds) == (10, 20.0)


def test_paused_time_is_not_training_time_but_counts_in_the_eta():
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.start(0)
    clock.now = 5.0
    timer.pause()
    clock.now = 65.0  # A one-minute evaluation.
    timer.resume()
    timer.resume()  # A second resume changes nothing.
    clock.now = 70.0
    window = timer.window(10, 20)
    assert window.seconds == pytest.approx(10.0)
    assert window.eta_seconds == pytest.approx(70.0)  # 7 s of wall time per step, 10 steps left
    timer.pause()
    clock.now = 80.0
    window = timer.window(10, 20)  # Ends inside the pause: no steps, no training time.
    assert (window.steps, window.seconds, window.steps_per_sec) == (0, 0.0, None)
    clock.now = 90.0
    timer.resume()
    clock.now = 95.0
    assert timer.window(15, 20).seconds == pytest.approx(5.0)


def test_a_window_with_no_finished_step_has_no_rate():
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.start(1)
    window = timer.window(1, 10)  # Logging every step: step 1 is the compile step.
    assert window.steps_per_sec is None and math.isnan(window.eta_seconds)


def test_window_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="before start"):
        StepTimer(FakeClock()).window(1, 10)
