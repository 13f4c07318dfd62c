"""TCP header and options: round trips, option edge cases, malformed input."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import BadPacket
from stack.wire.tcp import (
    ACK,
    FIN,
    NO_OPTIONS,
    RST,
    SYN,
    TcpHeader,
    TcpOptions,
    _emit_options_general,
    emit_options,
    emit_tcp_header,
    parse_tcp_untrusted,
)
from tests.stack.wire.strategies import tcp_headers


def with_raw_options(options: bytes, payload: bytes = b"") -> bytes:
    """A header carrying `options` verbatim (padded to 32 bits with EOL)."""
    options += bytes(-len(options) % 4)
    fixed = emit_tcp_header(TcpHeader(1, 2, 3, 4, ACK, 5))
    off = (20 + len(options)) // 4 << 4
    return fixed[:12] + bytes([off]) + fixed[13:] + options + payload


def options_of(options: bytes) -> TcpOptions:
    return parse_tcp_untrusted(memoryview(with_raw_options(options)))[0].options


@given(tcp_headers(), st.binary(max_size=64))
def test_round_trip(h: TcpHeader, payload: bytes) -> None:
    raw = emit_tcp_header(h)
    parsed, body = parse_tcp_untrusted(memoryview(raw + payload))
    assert parsed == h
    assert bytes(body) == payload
    assert emit_tcp_header(parsed) == raw


@given(tcp_headers())
def test_every_truncation_is_bad(h: TcpHeader) -> None:
    raw = emit_tcp_header(h)
    for n in range(len(raw)):
        with pytest.raises(BadPacket):
            parse_tcp_untrusted(memoryview(raw[:n]))


def test_timestamp_fast_path_equals_general_parse() -> None:
    ts_only = b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 9)
    # Same option, other layout: the general loop must agree.
    ts_other = b"\x08\x0a" + struct.pack("!II", 7, 9) + b"\x01\x00"
    assert options_of(ts_only) == options_of(ts_other) == TcpOptions(timestamp=(7, 9))


def test_linux_syn_options() -> None:
    raw = bytes.fromhex("020405b40402080a0000000100000000" + "01030307")
    assert options_of(raw) == TcpOptions(1460, 7, True, (), (1, 0))


def _emitted(emit: Callable[[TcpOptions], bytes], options: TcpOptions) -> object:
    try:
        return emit(options)
    except (ValueError, struct.error) as exc:
        return type(exc)


_full_syn_options = st.builds(
    TcpOptions,
    st.integers(-1, 1 << 16),
    st.integers(-1, 256),
    st.just(True),
    st.just(()),
    st.tuples(st.integers(-1, 1 << 32), st.integers(0, 1 << 32)),
)
_any_options = st.builds(
    TcpOptions,
    st.none() | st.integers(-1, 1 << 16),
    st.none() | st.integers(-1, 256),
    st.booleans(),
    st.sampled_from([(), ((1, 2),)]),
    st.none() | st.tuples(st.integers(-1, 1 << 32), st.integers(0, 1 << 32)),
)


@given(_full_syn_options | _any_options)
def test_syn_options_fast_emit_equals_the_general_one(options: TcpOptions) -> None:
    """All four SYN options in one pack: the general path's bytes, and an
    out-of-range field still rejected (as `ValueError`)."""
    fast = _emitted(emit_options, options)
    general = _emitted(_emit_options_general, options)
    if isinstance(general, bytes):
        assert fast == general
    else:
        assert fast is ValueError


def test_linux_syn_options_are_emitted_in_linux_layout() -> None:
    raw = bytes.fromhex("020405b40402080a0000000100000000" + "01030307")
    assert emit_options(TcpOptions(1460, 7, True, (), (1, 0))) == raw


def test_sack_blocks() -> None:
    blocks = ((1, 2), (3, 4), (5, 6), (7, 8))
    raw = b"\x01\x01\x05\x22" + struct.pack("!8I", *(e for b in blocks for e in b))
    assert options_of(raw).sack_blocks == blocks


def test_eol_ends_options() -> None:
    assert options_of(b"\x00\x02\x04\x05\xb4") == NO_OPTIONS


def test_unknown_and_wrong_length_options_are_skipped() -> None:
    # Kind 30 (MPTCP), MSS with length 3, window scale with length 4.
    raw = b"\x1e\x04\xaa\xbb" + b"\x02\x03\x05" + b"\x03\x04\x07\x00" + b"\x02\x04\x05\xb4"
    assert options_of(raw) == TcpOptions(mss=1460)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x02",  # kind without a length byte
        b"\x01\x01\x01\x02",  # ditto, after NOPs
        b"\x02\x01\x00\x00",  # length below 2
        b"\x08\x0a\x00\x00",  # runs past the header
    ],
)
def test_malformed_options(raw: bytes) -> None:
    with pytest.raises(BadPacket, match="option"):
        options_of(raw)


@pytest.mark.parametrize("bad", [SYN | FIN, SYN | RST, SYN | FIN | RST | ACK])
def test_syn_with_fin_or_rst(bad: int) -> None:
    raw = bytearray(emit_tcp_header(TcpHeader(1, 2, 3, 4, SYN, 5)))
    raw[13] = bad
    with pytest.raises(BadPacket, match="SYN"):
        parse_tcp_untrusted(memoryview(bytes(raw)))
    with pytest.raises(ValueError, match="SYN"):
        emit_tcp_header(TcpHeader(1, 2, 3, 4, bad, 5))


@pytest.mark.parametrize("offset_words", [0, 4, 15])
def test_data_offset_out_of_range(offset_words: int) -> None:
    raw = bytearray(emit_tcp_header(TcpHeader(1, 2, 3, 4, ACK, 5)))
    raw[12] = offset_words << 4
    with pytest.raises(BadPacket, match="offset"):
        parse_tcp_untrusted(memoryview(bytes(raw)))


@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_bad_packet(data: bytes) -> None:
    try:
        h, body = parse_tcp_untrusted(memoryview(data))
    except BadPacket:
        return
    assert len(body) <= len(data) - 20
    assert not (h.flags & SYN and h.flags & (FIN | RST))


def test_emit_rejects_what_does_not_fit() -> None:
    too_many = TcpOptions(mss=1460, timestamp=(1, 2), sack_blocks=((1, 2),) * 3)
    with pytest.raises(ValueError, match="40"):
        emit_options(too_many)
    with pytest.raises(ValueError, match="range"):
        emit_tcp_header(TcpHeader(1 << 16, 2, 3, 4, ACK, 5))
