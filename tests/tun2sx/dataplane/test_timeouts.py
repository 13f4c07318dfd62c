"""ConnectTimeouts: consecutive time-outs, the back-off, the bound."""

from __future__ import annotations

from tun2sx.dataplane.timeouts import ConnectTimeouts


def test_fails_at_once_after_the_threshold_for_the_backoff_only() -> None:
    memory = ConnectTimeouts(threshold=3, backoff=5.0)
    for now in (10.0, 20.0):
        memory.timed_out("a", now)
        assert not memory.failing("a", now)
    memory.timed_out("a", 30.0)
    assert memory.failing("a", 30.0) and memory.failing("a", 34.9)
    assert not memory.failing("a", 35.0)  # the next connect dials again
    assert not memory.failing("b", 30.0)
    # Still past the threshold: one more time-out backs off again at once.
    memory.timed_out("a", 45.0)
    assert memory.failing("a", 45.0)
    # One success clears the record.
    memory.connected("a")
    memory.timed_out("a", 50.0)
    assert not memory.failing("a", 50.0) and len(memory) == 1


def test_the_least_recently_failed_destination_is_forgotten_first() -> None:
    memory = ConnectTimeouts(threshold=1, backoff=5.0, max_entries=2)
    memory.timed_out("a", 0.0)
    memory.timed_out("b", 0.0)
    memory.timed_out("a", 1.0)  # "a" is now the most recent
    memory.timed_out("c", 1.0)
    assert len(memory) == 2
    assert memory.failing("a", 1.0) and memory.failing("c", 1.0)
    assert not memory.failing("b", 1.0)
