"""Timers: level gating, accumulation, and Megatron-LM's printed block for each option."""

import time

from megatron.core.timers import DummyTimer, Timers


def test_timers_above_the_level_are_one_shared_no_op():
    timers = Timers(log_level=0)
    assert isinstance(timers("forward-compute", log_level=2), DummyTimer)
    assert timers("forward-compute", 2) is timers("optimizer", 1)
    assert timers("interval-time", log_level=0) is not timers("optimizer", 1)
    assert timers.get_all_timers_string(["forward-compute"]) is None


def test_elapsed_accumulates_until_reset():
    timers = Timers(log_level=2)
    t = timers("x", 1)
    for _ in range(2):
        t.start()
        time.sleep(0.01)
        t.stop()
    first = t.elapsed(reset=False)
    assert first >= 0.02 and t.elapsed() == first and t.elapsed() == 0.0
    t.start()  # a running timer keeps running across elapsed()
    time.sleep(0.01)
    assert t.elapsed() >= 0.01
    t.stop()
    assert t.active_time() >= 0.03


def _with_times(option, times):
    timers = Timers(log_level=2, log_option=option)
    for name, seconds in times.items():
        timers(name, 1)._elapsed = seconds
    return timers


def test_printed_blocks_match_megatron():
    times = {"forward-backward": 0.5, "optimizer": 0.25}
    names = ["forward-backward", "never-ran", "optimizer"]
    assert _with_times("minmax", times).get_all_timers_string(names, normalizer=10) == (
        "(min, max) time across ranks (ms):\n"
        "    forward-backward ...............................: (50.00, 50.00)\n"
        "    optimizer ......................................: (25.00, 25.00)")
    assert _with_times("max", times).get_all_timers_string(names, normalizer=10) == (
        "max time across ranks (ms):\n"
        "    forward-backward ...............................: 50.00\n"
        "    optimizer ......................................: 25.00")
    assert _with_times("all", times).get_all_timers_string(names) == (
        "times across ranks (ms):\n  forward-backward:\n     rank  0: 500.00\n"
        "  optimizer:\n     rank  0: 250.00")


def test_write_gives_seconds_per_iteration_under_name_time():
    written = []

    class Writer:
        def add_scalar(self, name, value, step):
            written.append((name, value, step))
    _with_times("minmax", {"optimizer": 0.25}).write(["optimizer", "x"], Writer(), 7,
                                                     normalizer=5)
    assert written == [("optimizer-time", 0.05, 7)]
