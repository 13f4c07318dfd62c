"""Which destinations' connects keep timing out, to fail new ones at once.

A destination that never answers holds every SYN sent to it for the whole
connect timeout, each with a flow task and an outbound dial. After a few
consecutive time-outs to one destination (the address and port the
application used), `ConnectTimeouts` says to fail new flows to it at
once, with the ICMP a time-out would give, for a short back-off; the first
flow after the back-off dials again, and one success clears the record.
The memory is bounded: beyond `max_entries` the least recently failed
destination is forgotten. Time is passed in.
"""

from __future__ import annotations

from collections.abc import Hashable


class ConnectTimeouts:
    """A bounded memory of consecutive connect time-outs per destination.

    Args:
        threshold: consecutive time-outs after which new connects fail at once.
        backoff: how long they fail at once after each further time-out, seconds.
        max_entries: how many destinations are remembered.
    """

    __slots__ = ("_backoff", "_entries", "_max_entries", "_threshold")

    def __init__(self, threshold: int = 3, backoff: float = 5.0, max_entries: int = 4096) -> None:
        self._threshold = threshold
        self._backoff = backoff
        self._max_entries = max_entries
        # destination -> (consecutive time-outs, fail at once until); the
        # most recently failed last.
        self._entries: dict[Hashable, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def failing(self, dest: Hashable, now: float) -> bool:
        """Whether a new connect to `dest` should fail at once."""
        entry = self._entries.get(dest)
        return entry is not None and now < entry[1]

    def timed_out(self, dest: Hashable, now: float) -> None:
        """Record a connect to `dest` that timed out at `now`."""
        entries = self._entries
        count = entries.pop(dest, (0, 0.0))[0] + 1
        until = now + self._backoff if count >= self._threshold else now
        entries[dest] = (count, until)
        if len(entries) > self._max_entries:
            del entries[next(iter(entries))]

    def connected(self, dest: Hashable) -> None:
        """Record a connect to `dest` that succeeded: it is trusted again."""
        self._entries.pop(dest, None)
