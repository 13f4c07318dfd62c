"""The send buffer: octets the runtime queued that the peer has not yet acknowledged.

It knows positions (unwrapped ints of our send sequence space, the first
data octet at 1) but nothing of windows, congestion or timers: `snd.Sender`
decides what leaves and when, and asks this buffer only for room, for the
bytes of a segment, and to forget what the peer acknowledged. Kept apart
(as smoltcp's socket keeps its `tx_buffer`) so the sender's logic reads
positions, not buffer offsets.

The octets are kept as the immutable chunks the runtime queued (a `bytes`
read from the outbound is kept as it is, not copied), each with the
position of its first octet. One bytearray, appended at the end and cut at
the front, was copied whole by CPython whenever it shrank below half its
allocation and grew again: at 512 KB, tens of µs several times per round
trip of a download. Small writes are joined into the last chunk up to
`_JOIN_BELOW`, so an application writing a byte at a time does not make a
segment a join of a thousand pieces.
"""

from __future__ import annotations

from bisect import bisect_right

# Chunks shorter than this take the next small write into them (one copy of
# at most this much), so at most `capacity / _JOIN_BELOW` chunks are held
# besides the large ones.
_JOIN_BELOW = 4096


class SendBuffer:
    """Queued octets from position `start` up to (not including) `end`.

    Attributes:
        start: position of the first octet held.
        end: position after the last queued octet.
    """

    __slots__ = ("_cap", "_chunks", "_starts", "end", "start")

    def __init__(self, capacity: int) -> None:
        # Read-only views of immutable bytes: a segment's payload is a slice.
        self._chunks: list[memoryview] = []
        self._starts: list[int] = []  # the position of each chunk's first octet
        self._cap = capacity
        self.start = 1
        self.end = 1

    def space(self) -> int:
        """Return how many bytes `queue` would accept now."""
        free = self._cap - (self.end - self.start)
        return free if free > 0 else 0

    def queue(self, data: bytes | memoryview) -> int:
        """Append as much of `data` as fits; return the count."""
        n = min(len(data), self._cap - (self.end - self.start))
        if n <= 0:
            return 0
        # A whole `bytes` is kept as it is (its slice [:n] is itself); anything
        # else is copied, since its owner may change it.
        chunk = data[:n] if type(data) is bytes else bytes(data[:n])
        chunks = self._chunks
        if n < _JOIN_BELOW and chunks and len(chunks[-1]) < _JOIN_BELOW:
            chunks[-1] = memoryview(chunks[-1].tobytes() + chunk)
        else:
            chunks.append(memoryview(chunk))
            self._starts.append(self.end)
        self.end += n
        return n

    def release(self, upto: int) -> None:
        """Forget every octet below position `upto` (the peer has them)."""
        cut = min(upto, self.end)
        if cut <= self.start:
            return
        self.start = cut
        if cut == self.end:
            self._chunks.clear()
            self._starts.clear()
            return
        # The chunk holding position `cut` stays (its head is never asked
        # for again); every chunk before it goes.
        k = bisect_right(self._starts, cut) - 1
        if k:
            del self._chunks[:k]
            del self._starts[:k]

    def payload(self, start: int, length: int) -> bytes | memoryview:
        """Return `length` octets from position `start` (all queued, not released).

        A read-only view of the chunk that holds them, no copy; a segment
        that spans chunks is joined from their slices (one copy).
        """
        if length <= 0:
            return b""  # a FIN alone (the tail loss probe asks for it so)
        starts, chunks = self._starts, self._chunks
        i = bisect_right(starts, start) - 1
        chunk = chunks[i]
        offset = start - starts[i]
        stop = offset + length
        if stop <= len(chunk):
            # A view: the chunk is immutable, and the packet builder copies
            # it behind the header anyway (one copy instead of two).
            return chunk[offset:stop]
        parts = [chunk[offset:]]
        need = stop - len(chunk)
        while need > 0:
            i += 1
            chunk = chunks[i]
            parts.append(chunk[:need])
            need -= len(chunk)
        return b"".join(parts)

    def payloads(self, start: int, stop: int, size: int) -> list[bytes | memoryview]:
        """Return `payload(pos, size)` for each pos from `start` below `stop`, by `size`.

        The same values, the chunks walked in order instead of searched for
        each segment.
        """
        starts, chunks = self._starts, self._chunks
        i = bisect_right(starts, start) - 1
        out: list[bytes | memoryview] = []
        append = out.append
        pos = start
        while pos < stop:
            chunk = chunks[i]
            offset = pos - starts[i]
            end = offset + size
            n = len(chunk)
            if end <= n:
                append(chunk[offset:end])
                if end == n:
                    i += 1
            else:
                # Across chunks: joined as `payload` joins it.
                append(self.payload(pos, size))
                i = bisect_right(starts, pos + size) - 1
            pos += size
        return out
