"""The profiled window of steps (trace start and stop injected: no real trace is taken)."""

from __future__ import annotations

import pytest

from ling_jax.train.profiling import ProfileWindow


def test_traces_the_configured_steps_once():
    calls = []
    window = ProfileWindow(
        "logdir",
        3,
        2,
        start_trace=lambda d: calls.append(("start", d)),
        stop_trace=lambda: calls.append(("stop",)),
    )
    for step in range(1, 9):
        window(step, None)
        calls.append(step)
    window.close()
    assert calls == [1, 2, ("start", "logdir"), 3, 4, ("stop",), 5, 6, 7, 8]


def test_a_run_ending_inside_the_window_stops_the_trace():
    calls = []
    window = ProfileWindow(
        "d", 1, 10, lambda d: calls.append("start"), lambda: calls.append("stop")
    )
    window(1, None)
    window.close()
    window.close()
    assert calls == ["start", "stop"]


def test_empty_window_is_refused():
    with pytest.raises(ValueError, match="profile_num_steps = 0"):
        ProfileWindow("d", 1, 0)
