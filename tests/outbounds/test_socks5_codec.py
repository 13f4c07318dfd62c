"""The sans-I/O SOCKS5 codec: whole, byte-by-byte and with trailing data."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbounds.base import Destination, FailureReply
from outbounds.socks5 import (
    NEED_DATA,
    AuthFailed,
    Command,
    ReplyCode,
    Socks5ClientConnection,
    Socks5Outbound,
    Socks5ProtocolError,
    Socks5Reply,
    build_reply,
    build_request,
    decode_udp_datagram_untrusted,
    encode_address,
    encode_udp_datagram,
    parse_address_untrusted,
    parse_request_untrusted,
    parse_socks5_url,
)

TARGET = Destination("example.com", 443)
BOUND = Destination(ipaddress.IPv4Address("10.1.2.3"), 4321)

hosts = st.one_of(
    st.ip_addresses(),
    st.text(
        alphabet=st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=255
    ),
    # Arbitrary bytes survive as surrogate-escaped text.
    st.binary(min_size=1, max_size=255).map(lambda b: b.decode("utf-8", "surrogateescape")),
).filter(lambda h: not isinstance(h, str) or len(h.encode("utf-8", "surrogateescape")) <= 255)
destinations = st.builds(Destination, hosts, st.integers(0, 65535))


def feed(conn: Socks5ClientConnection, data: bytes, *, byte_by_byte: bool) -> list[object]:
    """Feed `data` and collect every event until NEED_DATA or a final event."""
    events: list[object] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    for chunk in chunks:
        conn.receive_data(chunk)
        event = conn.next_event_untrusted()
        if event is not NEED_DATA:
            events.append(event)
            break
    return events


@pytest.mark.parametrize("byte_by_byte", [False, True])
@pytest.mark.parametrize("trailing", [b"", b"220 smtp.example.com ready\r\n"])
def test_no_auth_connect(byte_by_byte: bool, trailing: bytes) -> None:
    conn = Socks5ClientConnection(Command.CONNECT, TARGET)
    assert conn.data_to_send() == b"\x05\x01\x00"
    assert feed(conn, b"\x05\x00", byte_by_byte=byte_by_byte) == []
    assert conn.data_to_send() == b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    reply = build_reply(ReplyCode.SUCCEEDED, BOUND) + trailing
    [event] = feed(conn, reply, byte_by_byte=False) if not byte_by_byte else _drip(conn, reply)
    assert event == Socks5Reply(0, BOUND)
    assert conn.trailing_data == trailing
    assert conn.data_to_send() == b""


def _drip(conn: Socks5ClientConnection, data: bytes) -> list[object]:
    # Trailing bytes that arrive after the reply was recognised are the
    # stream's, not the codec's: stop at the first event, then hand the rest.
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        event = conn.next_event_untrusted()
        if event is not NEED_DATA:
            conn.receive_data(data[i + 1 :])
            return [event]
    return []


def test_reply_glued_to_method_selection() -> None:
    """A proxy that pipelines everything in one segment still parses in order."""
    conn = Socks5ClientConnection(Command.CONNECT, TARGET)
    conn.data_to_send()
    conn.receive_data(b"\x05\x00" + build_reply(0, BOUND) + b"xyz")
    assert conn.next_event_untrusted() == Socks5Reply(0, BOUND)
    assert conn.trailing_data == b"xyz"


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_username_password(byte_by_byte: bool) -> None:
    conn = Socks5ClientConnection(Command.CONNECT, TARGET, b"user", b"pw")
    assert conn.data_to_send() == b"\x05\x02\x00\x02"
    assert feed(conn, b"\x05\x02", byte_by_byte=byte_by_byte) == []
    assert conn.data_to_send() == b"\x01\x04user\x02pw"
    assert feed(conn, b"\x01\x00", byte_by_byte=byte_by_byte) == []
    assert conn.data_to_send() == build_request(Command.CONNECT, TARGET)
    [event] = feed(conn, build_reply(0, BOUND), byte_by_byte=byte_by_byte)
    assert event == Socks5Reply(0, BOUND)


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_pipelined_no_auth(byte_by_byte: bool) -> None:
    """Greeting and request leave together; the answers come as before."""
    conn = Socks5ClientConnection(Command.CONNECT, TARGET, pipeline=True)
    assert conn.data_to_send() == b"\x05\x01\x00" + build_request(Command.CONNECT, TARGET)
    assert feed(conn, b"\x05\x00", byte_by_byte=byte_by_byte) == []
    assert conn.data_to_send() == b""
    [event] = feed(conn, build_reply(0, BOUND), byte_by_byte=byte_by_byte)
    assert event == Socks5Reply(0, BOUND)
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_pipelined_username_password(byte_by_byte: bool) -> None:
    """Only username/password is offered, since the credentials are already on the way."""
    conn = Socks5ClientConnection(Command.CONNECT, TARGET, b"user", b"pw", pipeline=True)
    request = build_request(Command.CONNECT, TARGET)
    assert conn.data_to_send() == b"\x05\x01\x02" + b"\x01\x04user\x02pw" + request
    answers = b"\x05\x02\x01\x00" + build_reply(0, BOUND) + b"tail"
    [event] = feed(conn, answers, byte_by_byte=False) if not byte_by_byte else _drip(conn, answers)
    assert event == Socks5Reply(0, BOUND)
    assert conn.trailing_data == b"tail"
    assert conn.data_to_send() == b""


def test_pipelined_credentials_refuse_a_method_not_offered() -> None:
    """A proxy choosing "no auth" would read our credentials as a request."""
    conn = Socks5ClientConnection(Command.CONNECT, TARGET, b"user", b"pw", pipeline=True)
    conn.data_to_send()
    conn.receive_data(b"\x05\x00")
    with pytest.raises(Socks5ProtocolError, match="not offered"):
        conn.next_event_untrusted()


def test_auth_rejections() -> None:
    conn = Socks5ClientConnection(Command.CONNECT, TARGET)
    conn.receive_data(b"\x05\xff")
    assert isinstance(conn.next_event_untrusted(), AuthFailed)

    conn = Socks5ClientConnection(Command.CONNECT, TARGET, b"u", b"p")
    conn.receive_data(b"\x05\x02\x01\x01")
    event = conn.next_event_untrusted()
    assert isinstance(event, AuthFailed) and "rejected" in event.reason


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x00",  # SOCKS4 version
        b"\x05\x02",  # chose user/pass we did not offer
        b"\x05\x00\x05\x00\x00\x09",  # unknown ATYP in reply
        b"\x05\x00\x05\x00\x00\x03\x00\x00\x00",  # empty domain
        b"\x05\x00\x06\x00",  # reply version wrong
    ],
)
def test_protocol_errors(data: bytes) -> None:
    conn = Socks5ClientConnection(Command.CONNECT, TARGET)
    conn.receive_data(data)
    with pytest.raises(Socks5ProtocolError):
        conn.next_event_untrusted()


def test_credentials_validated() -> None:
    with pytest.raises(ValueError, match="together"):
        Socks5ClientConnection(Command.CONNECT, TARGET, b"u", None)
    with pytest.raises(ValueError, match=r"1\.\.255"):
        Socks5ClientConnection(Command.CONNECT, TARGET, b"u" * 256, b"p")


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (0x01, FailureReply.RESET),
        (0x02, FailureReply.ADMIN_PROHIBITED),
        (0x03, FailureReply.NET_UNREACHABLE),
        (0x04, FailureReply.HOST_UNREACHABLE),
        (0x05, FailureReply.RESET),
        (0x06, FailureReply.HOST_UNREACHABLE),
        (0x07, FailureReply.RESET),
        (0x08, FailureReply.RESET),
        (0x42, FailureReply.RESET),
    ],
)
def test_reply_code_mapping(code: int, reply: FailureReply) -> None:
    event = Socks5Reply(code, BOUND)
    assert not event.succeeded
    assert event.failure() is reply
    assert event.describe()


@given(destinations)
def test_address_round_trip(dest: Destination) -> None:
    encoded = encode_address(dest)
    assert parse_address_untrusted(encoded + b"tail", 0) == (dest, len(encoded))
    # Every strict prefix is "incomplete", never an error or a wrong answer.
    for cut in range(len(encoded)):
        assert parse_address_untrusted(encoded[:cut], 0) is None


@given(st.sampled_from(Command), destinations)
def test_request_round_trip(command: Command, dest: Destination) -> None:
    encoded = build_request(command, dest)
    assert parse_request_untrusted(encoded) == (command, dest, len(encoded))


@given(destinations, st.binary(max_size=64))
def test_udp_datagram_round_trip(dest: Destination, payload: bytes) -> None:
    assert decode_udp_datagram_untrusted(encode_udp_datagram(payload, dest)) == (0, dest, payload)


@given(destinations, st.integers(0, 255))
def test_reply_round_trip(bound: Destination, code: int) -> None:
    conn = Socks5ClientConnection(Command.UDP_ASSOCIATE, TARGET)
    conn.receive_data(b"\x05\x00" + build_reply(code, bound))
    assert conn.next_event_untrusted() == Socks5Reply(code, bound)


# Replies after the version byte: any bytes, and IPv4 replies (the one-unpack
# path), whole, cut short or with more behind.
_ipv4_replies = st.builds(
    lambda head, address, rest: bytes(head) + b"\x01" + address + rest,
    st.lists(st.integers(0, 255), min_size=2, max_size=2),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=8),
)
_cut_replies = st.tuples(_ipv4_replies, st.integers(0, 16)).map(lambda r: r[0][: r[1]])


@given(st.one_of(st.binary(max_size=40), _ipv4_replies, _cut_replies))
def test_a_reply_is_read_as_the_address_parser_reads_it(after_version: bytes) -> None:
    """The client's IPv4 reply path and `parse_address_untrusted` agree:
    the same reply, the same incompleteness, the same error and trailing data."""
    data = b"\x05" + after_version
    conn = Socks5ClientConnection(Command.CONNECT, TARGET)
    conn.receive_data(b"\x05\x00")
    assert conn.next_event_untrusted() is NEED_DATA
    conn.receive_data(data)
    try:
        event: object = conn.next_event_untrusted()
    except Socks5ProtocolError as exc:
        event = str(exc)
    try:
        parsed = parse_address_untrusted(data, 3) if len(data) >= 3 else None
    except Socks5ProtocolError as exc:
        assert event == str(exc)
        return
    if parsed is None:
        assert event is NEED_DATA
        return
    bound, end = parsed
    assert event == Socks5Reply(data[1], bound)
    assert conn.trailing_data == data[end:]


@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_client_parser_raises_only_its_error(data: bytes, with_auth: bool, pipeline: bool) -> None:
    creds = (b"u", b"p") if with_auth else (None, None)
    conn = Socks5ClientConnection(Command.CONNECT, TARGET, *creds, pipeline=pipeline)
    conn.receive_data(data)
    with contextlib.suppress(Socks5ProtocolError):
        conn.next_event_untrusted()


@given(st.binary(max_size=300))
def test_other_parsers_raise_only_their_error(data: bytes) -> None:
    for parse in (decode_udp_datagram_untrusted, parse_request_untrusted):
        with contextlib.suppress(Socks5ProtocolError):
            parse(data)


def test_parse_url() -> None:
    out = parse_socks5_url("socks5://al%40ice:p%3Ass@127.0.0.1:1080")
    assert isinstance(out, Socks5Outbound)
    assert out.name == "socks5 127.0.0.1:1080"
    assert repr(Socks5Outbound.from_url("socks5://[::1]:9050")) == "<Socks5Outbound [::1]:9050>"
    assert parse_socks5_url("socks5://proxy.lan:1080/").name == "socks5 proxy.lan:1080"


def test_parse_url_pipeline() -> None:
    """`?pipeline=1` turns pipelining on; it is off without it or with 0."""
    for url, expected in (
        ("socks5://127.0.0.1:1080?pipeline=1", True),
        ("socks5://u:p@127.0.0.1:1080/?pipeline=1", True),
        ("socks5://127.0.0.1:1080?pipeline=0", False),
        ("socks5://127.0.0.1:1080", False),
    ):
        assert parse_socks5_url(url).pipeline is expected, url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:1080", "scheme"),
        ("socks5://127.0.0.1", "missing port"),
        ("socks5://127.0.0.1:99999", "port"),
        ("socks5://127.0.0.1:abc", "port"),
        ("socks5://:1080", "missing host"),
        ("socks5://user@127.0.0.1:1080", "credentials"),
        ("socks5://127.0.0.1:1080/path", "path"),
        ("socks5://127.0.0.1:1080?pipeline=yes", "pipeline=0|1"),
        ("socks5://127.0.0.1:1080?fast=1", "unexpected query fast=1"),
    ],
)
def test_parse_url_errors(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as info:
        parse_socks5_url(url)
    assert "\n" not in str(info.value)
