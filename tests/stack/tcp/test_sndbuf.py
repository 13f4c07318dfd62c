"""The send buffer, checked against a plain bytearray model of the same queue."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stack.tcp.sndbuf import SendBuffer

# Writes of every size class: single bytes (joined into one chunk), a few KB
# (around the join limit), whole reads from an outbound; as bytes, bytearray
# and memoryview, as the runtime hands them over.
writes = st.tuples(
    st.sampled_from([bytes, bytearray, memoryview]),
    st.one_of(st.integers(1, 8), st.integers(3000, 5000), st.integers(20_000, 70_000)),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), writes),
        st.tuples(st.just("release"), st.floats(0, 1.2)),
        st.tuples(st.just("payload"), st.tuples(st.floats(0, 1), st.integers(0, 9000))),
    ),
    max_size=60,
)


@given(st.integers(1, 300_000), steps)
def test_matches_a_bytearray_model(capacity: int, script: list[tuple[str, object]]) -> None:
    buf = SendBuffer(capacity)
    model = bytearray()  # the octets from position `start` on
    start = counter = 1
    for op, arg in script:
        if op == "queue":
            kind, size = arg  # type: ignore[misc]
            data = bytes((counter + i) & 0xFF for i in range(size))
            counter += size
            taken = buf.queue(kind(data))
            assert taken == min(size, capacity - len(model))
            model += data[:taken]
        elif op == "release":
            # Anywhere from the start to a little past the end (an ACK of
            # our FIN is one beyond the data).
            upto = start + int(arg * (len(model) + 2))  # type: ignore[operator]
            buf.release(upto)
            cut = max(0, min(upto, start + len(model)) - start)
            del model[:cut]
            start += cut
        else:
            where, length = arg  # type: ignore[misc]
            pos = start + int(where * len(model))
            length = min(length, start + len(model) - pos)
            got = buf.payload(pos, length)
            assert got == model[pos - start : pos - start + length]
            if length:
                # A run of segments of `length // 3 + 1` octets up to there.
                size = length // 3 + 1
                stop = pos + length - length % size
                run = buf.payloads(pos, stop, size)
                assert run == [buf.payload(at, size) for at in range(pos, stop, size)]
                assert b"".join(run) == model[pos - start : stop - start]
        assert (buf.start, buf.end) == (start, start + len(model))
        assert buf.space() == max(0, capacity - len(model))


def test_a_bytes_write_is_sent_from_without_a_copy() -> None:
    buf = SendBuffer(1 << 20)
    data = bytes(range(256)) * 256
    buf.queue(data)
    got = buf.payload(1449, 1448)
    assert isinstance(got, memoryview) and got.obj is data and got.readonly
    assert got == data[1448 : 2 * 1448]


def test_byte_at_a_time_writes_come_out_whole() -> None:
    buf = SendBuffer(1 << 20)
    for i in range(10_000):
        assert buf.queue(bytes([i & 0xFF])) == 1
    assert buf.payload(1, 10_000) == bytes(i & 0xFF for i in range(10_000))
    buf.release(4000)
    assert buf.payload(4000, 1448) == bytes(i & 0xFF for i in range(3999, 3999 + 1448))
