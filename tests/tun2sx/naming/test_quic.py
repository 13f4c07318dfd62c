"""Sniffing QUIC: the SNI inside a client's Initial packets (v1 and v2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.hellos import chaos_initials, quic_initials
from tun2sx.naming.quic import VERSION_1, VERSION_2, QuicSniffer, is_initial
from tun2sx.naming.sniff import NEED_DATA, Protocol, Sniffed

WANT = Sniffed(Protocol.QUIC, "video.example.com")


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2])
def test_one_datagram(version: int) -> None:
    datagrams = quic_initials(version=version)
    assert len(datagrams) == 1 and is_initial(datagrams[0])
    assert QuicSniffer().feed(datagrams[0]) == WANT


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2])
def test_client_hello_over_several_datagrams(version: int) -> None:
    datagrams = quic_initials(version=version, alpn_padding=10)
    assert len(datagrams) >= 3
    sniffer = QuicSniffer()
    for datagram in datagrams[:-1]:
        assert sniffer.feed(datagram) is NEED_DATA
    assert sniffer.feed(datagrams[-1]) == WANT


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2])
def test_chrome_shaped_initials(version: int) -> None:
    # CRYPTO frames cut small and shuffled, PING and PADDING between them,
    # two packets coalesced in the first datagram (as Chrome's "chaos
    # protection" sends a ClientHello with a post-quantum key share).
    datagrams = chaos_initials("chrome.example.com", version=version)
    assert len(datagrams) >= 3
    sniffer = QuicSniffer()
    for datagram in datagrams[:-1]:
        assert sniffer.feed(datagram) is NEED_DATA
    assert sniffer.feed(datagrams[-1]) == Sniffed(Protocol.QUIC, "chrome.example.com")
    # Any order of the datagrams.
    sniffer = QuicSniffer()
    results = [sniffer.feed(datagram) for datagram in reversed(datagrams)]
    assert results[-1] == Sniffed(Protocol.QUIC, "chrome.example.com")


def test_datagrams_out_of_order() -> None:
    datagrams = quic_initials(alpn_padding=10)
    sniffer = QuicSniffer()
    for datagram in reversed(datagrams[1:]):
        assert sniffer.feed(datagram) is NEED_DATA
    assert sniffer.feed(datagrams[0]) == WANT


def test_coalesced_initials_in_one_datagram() -> None:
    # Two Initial packets back to back in one datagram (RFC 9000 12.2).
    first, second, *rest = quic_initials(alpn_padding=5)
    assert not rest
    assert QuicSniffer().feed(first + second) == WANT


def test_the_answer_sticks() -> None:
    datagram = quic_initials()[0]
    sniffer = QuicSniffer()
    assert sniffer.feed(datagram) == WANT
    assert sniffer.feed(b"junk") == WANT


def test_not_quic() -> None:
    assert QuicSniffer().feed(b"") is None
    assert QuicSniffer().feed(b"\x01\x02 a DNS-ish datagram") is None
    short = bytes([0x40]) + bytes(40)  # a short-header packet
    assert QuicSniffer().feed(short) is None
    initial = bytearray(quic_initials()[0])
    initial[1:5] = (0xFACEB00C).to_bytes(4, "big")  # unknown version
    assert QuicSniffer().feed(bytes(initial)) is None
    assert not is_initial(bytes(initial))


def test_tampered_initial_is_not_read() -> None:
    initial = bytearray(quic_initials()[0])
    initial[100] ^= 1  # the ciphertext no longer matches its AEAD tag
    assert QuicSniffer().feed(bytes(initial)) is None


def test_other_connection_id_is_ignored() -> None:
    first = quic_initials(alpn_padding=10)
    other = quic_initials(alpn_padding=10)
    sniffer = QuicSniffer()
    assert sniffer.feed(first[0]) is NEED_DATA
    # Another client's datagrams do not complete this one's ClientHello.
    for datagram in other[1:]:
        assert sniffer.feed(datagram) is NEED_DATA
    for datagram in first[1:-1]:
        assert sniffer.feed(datagram) is NEED_DATA
    assert sniffer.feed(first[-1]) == WANT


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_initials_never_raise(data: st.DataObject) -> None:
    datagrams = [bytearray(d) for d in quic_initials(alpn_padding=data.draw(st.integers(0, 6)))]
    for datagram in datagrams:
        for _ in range(data.draw(st.integers(0, 4))):
            datagram[data.draw(st.integers(0, len(datagram) - 1))] = data.draw(st.integers(0, 255))
    sniffer = QuicSniffer()
    for datagram in datagrams:
        cut = data.draw(st.integers(0, len(datagram)))
        result = sniffer.feed(bytes(datagram[:cut]))
        assert result is None or result is NEED_DATA or isinstance(result, Sniffed)


@given(st.binary(max_size=1500))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = QuicSniffer().feed(data)
    assert result is None or result is NEED_DATA or isinstance(result, Sniffed)
