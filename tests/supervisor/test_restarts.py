"""The restart policy alone: backoff and crash-loop arithmetic on made-up clocks (no process)."""

from __future__ import annotations

from proxy.supervisor.restarts import Decision, RestartHistory, RestartPolicy


def test_first_death_restarts_at_once_then_the_wait_doubles_up_to_the_cap() -> None:
    history = RestartHistory(RestartPolicy(base=0.1, cap=1.0, loop_deaths=100))
    delays = [history.died(now=float(i), lived=0.5).delay for i in range(7)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_worker_that_lived_long_enough_starts_the_backoff_afresh() -> None:
    history = RestartHistory(RestartPolicy(base=0.1, reset_after=30.0))
    assert history.died(0.0, lived=1.0).delay == 0.0
    assert history.died(1.0, lived=1.0).delay == 0.1
    assert history.died(40.0, lived=31.0).delay == 0.0  # healthy for 31 s: at once again
    assert history.died(41.0, lived=1.0).delay == 0.1


def test_five_deaths_within_the_window_are_a_crash_loop_which_ends_as_they_age_out() -> None:
    history = RestartHistory(RestartPolicy(loop_deaths=5, loop_window=60.0))
    decisions = [history.died(float(t), lived=0.1) for t in (0, 1, 2, 3)]
    assert [d.crash_loop for d in decisions] == [False] * 4
    assert history.died(4.0, lived=0.1) == Decision(delay=0.8, crash_loop=True, deaths=5)
    assert history.in_crash_loop(30.0)
    assert not history.in_crash_loop(60.5)  # the first death is out of the window: 4 left


def test_deaths_spread_wider_than_the_window_are_no_loop() -> None:
    history = RestartHistory(RestartPolicy(loop_deaths=3, loop_window=10.0))
    assert not any(history.died(t, lived=0.1).crash_loop for t in (0.0, 6.0, 12.0, 18.0, 24.0))
