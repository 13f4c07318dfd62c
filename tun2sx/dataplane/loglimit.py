"""A log line that traffic can repeat, let through once per interval.

What it owns: when the line last went out and how many were held back since.
Some warnings are caused by what applications send (a datagram to a fake IP
nobody handed out, from an application that kept an address across a
restart): one per packet would fill the log. The first goes out at once,
then at most one per interval, saying how many it stands for.
"""

from __future__ import annotations

import math

__all__ = ["LogLimit"]


class LogLimit:
    """Lets a repeated log line through at most once per `interval` seconds.

    Args:
        interval: seconds between two lines that go out.
    """

    __slots__ = ("_held", "_interval", "_next")

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next = -math.inf
        self._held = 0

    def allow(self, now: float) -> int | None:
        """Whether the line goes out now.

        Returns:
            None to hold it back (it is counted); otherwise how many were
            held back since the last one that went out.
        """
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self._interval
        return held

    @staticmethod
    def suffix(held: int) -> str:
        """Text to append to the line: the count it stands for, if any."""
        return f" ({held} more like it since the last such line)" if held else ""
