"""The send buffer: octets the runtime queued that the peer has not yet acknowledged.

It knows positions (unwrapped ints of our send sequence space, the first
data octet at 1) but nothing of windows, congestion or timers: `snd.Sender`
decides what leaves and when, and asks this buffer only for room, for the
bytes of a segment, and to forget what the peer acknowledged. Kept apart
(as smoltcp's socket keeps its `tx_buffer`) so the sender's logic reads
positions, not buffer offsets.

Acknowledged octets are cut from the front of one bytearray, which CPython
does without moving the rest.
"""

from __future__ import annotations


class SendBuffer:
    """Queued octets from position `start` up to (not including) `end`.

    Attributes:
        start: position of the first octet held.
        end: position after the last queued octet.
    """

    __slots__ = ("_cap", "_data", "end", "start")

    def __init__(self, capacity: int) -> None:
        self._data = bytearray()
        self._cap = capacity
        self.start = 1
        self.end = 1

    def space(self) -> int:
        """Return how many bytes `queue` would accept now."""
        return max(0, self._cap - len(self._data))

    def queue(self, data: bytes | memoryview) -> int:
        """Append as much of `data` as fits; return the count."""
        n = min(len(data), self._cap - len(self._data))
        if n > 0:
            self._data += data[:n]
            self.end += n
            return n
        return 0

    def release(self, upto: int) -> None:
        """Forget every octet below position `upto` (the peer has them)."""
        cut = min(upto, self.end) - self.start
        if cut > 0:
            del self._data[:cut]
            self.start += cut

    def payload(self, start: int, length: int) -> bytearray:
        """Return `length` octets from position `start`.

        A bytearray slice: one copy (a `bytes()` around it made a second one
        of up to 64 KB per segment).
        """
        offset = start - self.start
        return self._data[offset : offset + length]
