"""Fuzz harness for the packet parser: every byte string the TUN could deliver.

Invariant: `parse_packet_untrusted` and each header parser return or raise
`BadPacket`, nothing else. On success a few consequences must also hold, so
the fuzzer finds wrong answers and not only crashes:

* a packet accepted with checksums verified is accepted without, identically;
* the IPv4+TCP fast path agrees with the general path (same packet or the
  same error);
* a parsed TCP header emits and parses back to itself (when its options fit);
* `build_icmp_error` quotes any packet the parser accepts.

Run under atheris with `python -m fuzz.run --minutes 5 packet_parser`; the
seed corpus lives in `fuzz/corpus/packet_parser/` and is regenerated (golden
kernel packets plus crafted edge cases) with
`python -m fuzz.packet_parser --write-seeds`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from stack.errors import BadPacket
from stack.wire import packet as packet_mod
from stack.wire.icmp import parse_icmp_untrusted
from stack.wire.ipv4 import IPv4Header, emit_ipv4_header, parse_ipv4_untrusted
from stack.wire.ipv6 import IPv6Header, emit_ipv6_header, parse_ipv6_untrusted
from stack.wire.packet import (
    build_icmp_error,
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    parse_packet_untrusted,
)
from stack.wire.tcp import (
    ACK,
    PSH,
    SYN,
    TcpHeader,
    TcpOptions,
    emit_tcp_header,
    parse_tcp_untrusted,
)
from stack.wire.udp import parse_udp_untrusted

_HEADER_PARSERS = (
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
    parse_tcp_untrusted,
    parse_udp_untrusted,
    parse_icmp_untrusted,
)
_US4 = bytes([198, 18, 0, 1])
_US6 = bytes.fromhex("fc00" + "00" * 13 + "01")


def TestOneInput(data: bytes) -> None:
    """Feed `data` to every wire parser; raise on anything but BadPacket."""
    buf = memoryview(data)
    for parse in _HEADER_PARSERS:
        with contextlib.suppress(BadPacket):
            parse(buf)
    try:
        verified = parse_packet_untrusted(buf)
    except BadPacket:
        verified = None
    try:
        unverified = parse_packet_untrusted(buf, verify_checksum=False)
    except BadPacket as exc:
        assert verified is None, f"accepted only when verifying: {exc}"
        unverified = None
    if verified is not None:
        assert unverified == verified
    for verify in (True, False):
        _same_as_general_path(buf, verify)
    if unverified is None:
        return
    l4 = unverified.l4
    if isinstance(l4, TcpHeader):
        try:
            raw = emit_tcp_header(l4)
        except ValueError:
            pass  # four SACK blocks and a timestamp do not fit when re-laid out
        else:
            assert parse_tcp_untrusted(memoryview(raw))[0] == l4
    ip = unverified.ip
    if isinstance(ip, IPv4Header):
        again = emit_ipv4_header(ip)
        hlen = 20 + len(ip.options)
        assert again[:10] + again[12:] == data[:10] + data[12:hlen]
        if verified is not None:
            # 0x0000 and 0xFFFF are the same one's-complement checksum; an
            # unverified parse may carry any value.
            assert int.from_bytes(again[10:12], "big") % 0xFFFF == ip.checksum % 0xFFFF
    else:
        assert isinstance(ip, IPv6Header)
        assert len(emit_ipv6_header(ip)) == 40
    us = _US4 if unverified.version == 4 else _US6
    error = build_icmp_error(data, us, 3 if unverified.version == 4 else 1, 0)
    parse_packet_untrusted(memoryview(error))


def _same_as_general_path(buf: memoryview, verify: bool) -> None:
    try:
        fast: object = parse_packet_untrusted(buf, verify_checksum=verify)
    except BadPacket as exc:
        fast = str(exc)
    try:
        general: object = packet_mod._parse_general(buf, len(buf), verify)
    except BadPacket as exc:
        general = str(exc)
    assert fast == general, (fast, general)


def seed_corpus() -> dict[str, bytes]:
    """Crafted edge cases for the seed corpus (golden packets are added too)."""
    a4, b4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    a6, b6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
    ts = TcpOptions(timestamp=(1, 2))
    every = TcpOptions(1460, 7, True, (), (1, 2))
    sack = TcpOptions(sack_blocks=((1, 2), (3, 4), (5, 6), (7, 8)))
    data4 = build_tcp_packet(a4, b4, TcpHeader(1, 2, 3, 4, ACK | PSH, 5, options=ts), bytes(1448))
    udp4 = build_udp_packet(a4, b4, 53, 5353, b"q")
    udp6 = build_udp_packet(a6, b6, 53, 5353, b"q")
    with_options = emit_ipv4_header(
        IPv4Header(0, 32, 1, 2, 0, 64, 17, 0, a4, b4, b"\x94\x04\x00\x00")
    ) + bytes(udp4[20:28])
    fragment = emit_ipv4_header(IPv4Header(0, 28, 1, 1, 0, 64, 17, 0, a4, b4)) + udp4[20:]
    hop = bytes([17, 0, 1, 4, 0, 0, 0, 0])
    v6_ext = emit_ipv6_header(IPv6Header(0, 0, 8 + len(udp6) - 40, 0, 64, a6, b6)) + hop
    v6_frag = emit_ipv6_header(IPv6Header(0, 0, 16, 44, 64, a6, b6)) + bytes([17]) + bytes(15)
    return {
        "tcp4-1500-timestamps": data4,
        "tcp4-syn-all-options": build_tcp_packet(
            a4, b4, TcpHeader(1, 2, 3, 0, SYN, 5, options=every)
        ),
        "tcp6-sack-blocks": build_tcp_packet(a6, b6, TcpHeader(1, 2, 3, 4, ACK, 5, options=sack)),
        "udp4-zero-checksum": udp4[:26] + b"\0\0" + udp4[28:],
        "udp6-zero-checksum": udp6[:46] + b"\0\0" + udp6[48:],
        "ipv4-options": with_options,
        "ipv4-fragment": fragment,
        "ipv6-hop-by-hop": v6_ext + udp6[40:],
        "ipv6-fragment-header": v6_frag,
        "icmp4-error": build_icmp_error(udp4, b4, 3, 3),
        "icmp6-echo": build_icmp_packet(a6, b6, 128, 0, 0x10001, b"ping"),
        "truncated-tcp4": data4[:30],
        # Accepted unverified, refused verified: the invariants must tell them apart.
        "tcp4-bad-ip-checksum": data4[:10] + b"\0\0" + data4[12:],
        "padded-udp4": udp4 + bytes(16),
        "empty": b"",
        "version-5": b"\x55" + bytes(39),
    }


def _write_seeds() -> None:
    out = Path(__file__).resolve().parent / "corpus" / "packet_parser"
    out.mkdir(parents=True, exist_ok=True)
    golden = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden"
    for path in sorted(golden.glob("*.bin")):
        (out / f"golden-{path.stem}").write_bytes(path.read_bytes())
    for name, data in seed_corpus().items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-seeds"]:
        _write_seeds()
    else:
        print("run with: python -m fuzz.run [--smoke | --minutes N packet_parser]")
