"""The sans-I/O HTTP CONNECT client: whole, byte by byte, with trailing data; its URL."""

from __future__ import annotations

import base64
import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbounds.base import Destination, FailureReply
from outbounds.handshake import NEED_DATA
from outbounds.http import (
    MAX_HEAD,
    HttpConnectClient,
    HttpConnectReply,
    HttpProtocolError,
    basic_credentials,
    build_connect_request,
    parse_http_url,
)
from outbounds.url import parse_outbound_url

TARGET = Destination("example.com", 443)


def feed(client: HttpConnectClient, data: bytes, *, byte_by_byte: bool) -> object:
    """Feed `data` whole or a byte at a time; the first event that is not NEED_DATA."""
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    for chunk in chunks:
        client.receive_data(chunk)
        event = client.next_event_untrusted()
        if event is not NEED_DATA:
            return event
    return NEED_DATA


def test_request_names_stay_names_and_ipv6_is_bracketed() -> None:
    assert build_connect_request(TARGET) == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    v6 = Destination(ipaddress.IPv6Address("2001:db8::1"), 8443)
    assert build_connect_request(v6).startswith(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n")
    v4 = Destination(ipaddress.IPv4Address("192.0.2.7"), 80)
    assert b"Host: 192.0.2.7:80\r\n" in build_connect_request(v4)


def test_basic_credentials_are_utf8_base64_of_user_colon_password() -> None:
    # RFC 7617 section 2's example, and a non-ASCII password in UTF-8.
    assert basic_credentials("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    token = basic_credentials("u", "pässwörd").split()[1]
    assert base64.b64decode(token) == "u:pässwörd".encode()
    request = build_connect_request(TARGET, basic_credentials("Aladdin", "open sesame"))
    assert b"\r\nProxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n" in request


@pytest.mark.parametrize("name", ["evil.test\r\nX-Injected: 1", "a b.test", "bücher.test", "a/b"])
def test_a_name_that_could_rewrite_the_request_is_never_sent(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        HttpConnectClient(Destination(name, 80))


@pytest.mark.parametrize("byte_by_byte", [False, True])
@pytest.mark.parametrize("trailing", [b"", b"SSH-2.0-OpenSSH_9.2\r\n"])
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 Connection established\r\n\r\n",
        b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n",
        b"HTTP/1.1 200\r\n\r\n",  # no reason phrase
        b"HTTP/1.1 200 OK\nVia: x\n\n",  # bare LF line ends
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",  # interim answer first
        # A 2xx to CONNECT has no body, whatever its headers say.
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    ],
)
def test_success_and_the_bytes_after_it(head: bytes, trailing: bytes, byte_by_byte: bool) -> None:
    client = HttpConnectClient(TARGET)
    assert client.data_to_send().startswith(b"CONNECT example.com:443 ")
    assert client.data_to_send() == b""
    event = feed(client, head + trailing, byte_by_byte=byte_by_byte)
    assert isinstance(event, HttpConnectReply) and event.succeeded
    # Byte by byte the answer is over before the trailing bytes came.
    assert client.trailing_data == (b"" if byte_by_byte else trailing)
    if byte_by_byte and trailing:
        client.receive_data(trailing)
        assert client.trailing_data == trailing


def test_failure_keeps_status_reason_and_headers() -> None:
    client = HttpConnectClient(TARGET)
    answer = (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="tinyproxy"\r\nbroken line\r\n\r\n<html>'
    )
    event = feed(client, answer, byte_by_byte=False)
    assert event == HttpConnectReply(
        407, "Proxy Authentication Required", (("proxy-authenticate", 'Basic realm="tinyproxy"'),)
    )
    assert isinstance(event, HttpConnectReply)
    assert event.header("Proxy-Authenticate") == 'Basic realm="tinyproxy"'
    assert event.describe() == "407 Proxy Authentication Required"
    assert event.failure() is FailureReply.RESET


@pytest.mark.parametrize(
    ("status", "reply"),
    [
        (403, FailureReply.ADMIN_PROHIBITED),
        (407, FailureReply.RESET),
        (500, FailureReply.RESET),
        (502, FailureReply.RESET),
        (503, FailureReply.RESET),
        (504, FailureReply.HOST_UNREACHABLE),
        (405, FailureReply.RESET),
        (599, FailureReply.RESET),
    ],
)
def test_status_mapping(status: int, reply: FailureReply) -> None:
    assert HttpConnectReply(status, "").failure() is reply


@pytest.mark.parametrize(
    "answer",
    [
        b"\x05\x00",  # a SOCKS5 server
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * MAX_HEAD + b"\r\n\r\n",
    ],
)
def test_what_is_not_an_http_answer_is_refused(answer: bytes) -> None:
    client = HttpConnectClient(TARGET)
    with pytest.raises(HttpProtocolError):
        feed(client, answer, byte_by_byte=False)


def test_an_endless_head_is_refused_before_its_end() -> None:
    client = HttpConnectClient(TARGET)
    client.receive_data(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1))
    with pytest.raises(HttpProtocolError, match="longer than"):
        client.next_event_untrusted()


@given(st.binary(max_size=300), st.booleans())
def test_client_raises_only_its_error(data: bytes, byte_by_byte: bool) -> None:
    client = HttpConnectClient(TARGET)
    with contextlib.suppress(HttpProtocolError):
        feed(client, data, byte_by_byte=byte_by_byte)


def test_url_credentials_and_flags() -> None:
    proxy = parse_http_url("http://user:p%40ss@proxy.test:3128?tfo=1")
    assert proxy.name == "http proxy.test:3128"
    assert proxy.fast_open is True
    assert parse_http_url("http://[::1]:8888").name == "http [::1]:8888"
    assert parse_http_url("http://[::1]:8888").fast_open is False
    assert parse_outbound_url("HTTP://127.0.0.1:8888").name == "http 127.0.0.1:8888"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1", "missing port"),
        ("http://:8888", "missing host"),
        ("http://127.0.0.1:8888/path", "unexpected path"),
        ("http://127.0.0.1:8888?pipeline=1", r"known: tfo=0\|1$"),
        ("http://a:b@127.0.0.1:99999", "port is not a number"),
        ("http://:secret@127.0.0.1:8888", "user name must be non-empty"),
        ("http://a:secret\uff03@127.0.0.1:8888", "not a URL"),
        ("http://a:secret@[::1:8888", "not a URL"),
    ],
)
def test_bad_urls_name_the_problem_and_never_the_password(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as info:
        parse_http_url(url)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
