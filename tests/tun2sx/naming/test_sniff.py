"""Sniffing TLS and HTTP: the host name in a TCP flow's first bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.hellos import split_records, tls_client_hello
from tun2sx.naming.sniff import (
    MAX_SNIFF_BYTES,
    NEED_DATA,
    Protocol,
    Sniffed,
    SniffResult,
    host_name,
    sniff_http,
    sniff_stream,
    sniff_tls,
)

BOTH = (Protocol.TLS, Protocol.HTTP)


def feed_growing(data: bytes, sniff: Callable[[bytes], SniffResult]) -> SniffResult:
    """Feed ever longer prefixes, as reads arrive: each prefix asks for
    more or already gives the final answer (never a give-up, never another
    name), and the answer is there once the whole message is."""
    final = sniff(data)
    for n in range(len(data)):
        assert sniff(data[:n]) in (NEED_DATA, final), f"prefix of {n} bytes"
    return final


# -- TLS --------------------------------------------------------------------


def test_sni_of_a_real_client_hello() -> None:
    assert sniff_tls(tls_client_hello("www.Example.org")) == Sniffed(
        Protocol.TLS, "www.example.org"
    )


def test_every_prefix_of_a_client_hello_asks_for_more() -> None:
    hello = tls_client_hello("cdn.example.net")
    for n in range(len(hello)):
        assert sniff_tls(hello[:n]) is NEED_DATA
    assert sniff_tls(hello) == Sniffed(Protocol.TLS, "cdn.example.net")


@pytest.mark.parametrize("size", [1, 7, 100, 512])
def test_client_hello_split_over_records(size: int) -> None:
    hello = split_records(tls_client_hello("split.example.com"), size)
    assert feed_growing(hello, sniff_tls) == Sniffed(Protocol.TLS, "split.example.com")


def test_trailing_bytes_after_the_hello_do_not_matter() -> None:
    hello = tls_client_hello("a.example") + b"\x17\x03\x03\x00\x05hello"
    assert sniff_tls(hello) == Sniffed(Protocol.TLS, "a.example")


def test_client_hello_without_sni_gives_no_name() -> None:
    assert sniff_tls(tls_client_hello(None)) is None


def test_not_tls() -> None:
    assert sniff_tls(b"SSH-2.0-OpenSSH_9.2\r\n") is None
    assert sniff_tls(b"\x16\x02\x00\x00\x10") is None  # SSL 2 record version
    assert sniff_tls(b"\x16\x03\x01\x00\x00") is None  # empty record
    # A handshake record that is not a ClientHello (a server's hello).
    assert sniff_tls(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00") is None
    # An alert record after half a ClientHello.
    half = split_records(tls_client_hello(), 50)[:55]
    assert sniff_tls(half + b"\x15\x03\x03\x00\x02\x02\x28") is None


def test_ip_literal_in_sni_is_no_name() -> None:
    # Python refuses to put an IP literal in SNI; patch one into a real hello.
    hello = tls_client_hello("abcdefgh.ij")
    assert sniff_tls(hello.replace(b"abcdefgh.ij", b"10.10.0.255")) is None


def test_a_huge_announced_hello_is_given_up() -> None:
    record = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff"
    assert sniff_tls(record) is None


# -- HTTP -------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"])
def test_host_field(method: bytes) -> None:
    request = method + b" /x?y=1 HTTP/1.1\r\nAccept: */*\r\nHOST: Www.Example.com:8080\r\n\r\n"
    assert feed_growing(request, sniff_http) == Sniffed(Protocol.HTTP, "www.example.com")


def test_absolute_form_wins_over_host() -> None:
    request = b"GET http://user@abs.example:81/p HTTP/1.1\r\nHost: other.example\r\n\r\n"
    assert sniff_http(request) == Sniffed(Protocol.HTTP, "abs.example")


def test_connect_names_its_authority() -> None:
    request = b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n"
    assert feed_growing(request, sniff_http) == Sniffed(Protocol.HTTP, "tunnel.example")


def test_host_found_before_the_head_is_whole() -> None:
    # A large cookie after Host must not make the flow wait for the rest.
    request = b"GET / HTTP/1.1\r\nHost: early.example\r\nCookie: " + b"c" * 100
    assert sniff_http(request) == Sniffed(Protocol.HTTP, "early.example")


def test_http_without_a_usable_host() -> None:
    assert sniff_http(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n") is None
    assert sniff_http(b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n") is None
    assert sniff_http(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n") is None
    assert sniff_http(b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n") is None
    assert sniff_http(b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n") is None


def test_not_http() -> None:
    assert sniff_http(b"SSH-2.0-OpenSSH_9.2\r\n") is None
    assert sniff_http(b"BREW /pot HTTP/1.1\r\n") is None
    assert sniff_http(b"GET / SPDY/3\r\n\r\n") is None
    assert sniff_http(b"GET /\n") is None
    assert sniff_http(b"EHLO mail.example\r\n") is None


def test_host_names() -> None:
    assert host_name(b"Example.COM.") == "example.com"
    assert host_name(b"_dmarc.example") == "_dmarc.example"
    for bad in (b"", b".", b"a..b", b"a" * 64 + b".com", b"exa mple", b"\xff.com", b"::1"):
        assert host_name(bad) is None, bad


# -- choosing ---------------------------------------------------------------


def test_stream_tries_each_protocol() -> None:
    assert sniff_stream(tls_client_hello("t.example"), BOTH) == Sniffed(Protocol.TLS, "t.example")
    request = b"GET / HTTP/1.1\r\nHost: h.example\r\n\r\n"
    assert sniff_stream(request, BOTH) == Sniffed(Protocol.HTTP, "h.example")
    # HTTP alone does not read TLS.
    assert sniff_stream(tls_client_hello("t.example"), (Protocol.HTTP,)) is None
    assert sniff_stream(b"", BOTH) is NEED_DATA
    assert sniff_stream(b"G", BOTH) is NEED_DATA
    assert sniff_stream(b"SSH-2.0-x\r\n", BOTH) is None


def test_stream_gives_up_at_the_bound() -> None:
    request = b"GET / HTTP/1.1\r\nCookie: " + b"c" * MAX_SNIFF_BYTES
    assert sniff_http(request[: MAX_SNIFF_BYTES - 1]) is NEED_DATA
    assert sniff_stream(request, BOTH) is None


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for result in (sniff_tls(data), sniff_http(data), sniff_stream(data, BOTH)):
        assert result is None or result is NEED_DATA or isinstance(result, Sniffed)


@settings(deadline=None)
@given(st.data())
def test_mutated_client_hello_never_raises(data: st.DataObject) -> None:
    hello = bytearray(split_records(tls_client_hello("m.example"), 300))
    for _ in range(data.draw(st.integers(1, 8))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    result = sniff_tls(bytes(hello[:cut]))
    assert result is None or result is NEED_DATA or isinstance(result, Sniffed)
