"""Fuzz harness for the fake-IP DNS server: every byte string a client could send to port 53.

Invariant: `FakeDns.handle_query_untrusted` returns or raises `BadDnsQuery`,
nothing else. Beyond not crashing, its answers must be right:

* a ready reply parses back, is a response (QR set) with the query's ID, and
  every A/AAAA record in it maps back to the queried name in the store;
* a FORMERR attached to `BadDnsQuery` parses and carries the query's ID;
* "forward" hands back the query bytes unchanged;
* the DNS-over-TCP framer splits a stream the same way whatever the chunking;
* `FakeDns.servfail` and `truncate_for_udp` never raise, and truncation fits.

The store uses a tiny pool so that recycling is exercised constantly.
Seeds live in `fuzz/corpus/dns_query/`; regenerate them with
`python -m fuzz.dns_query --write-seeds`.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from pathlib import Path

from dnslib import EDNS0, QTYPE, DNSRecord

from tun2sx.naming.dns import (
    BadDnsQuery,
    DnsForward,
    DnsReply,
    DnsTcpFramer,
    FakeDns,
    truncate_for_udp,
)
from tun2sx.naming.fakeip import FakeIpFilter, FakeIpStore, normalize_name

_STORE = FakeIpStore(v4_pool="10.99.0.0/28", v6_pool="fd00::/124", reserved=["10.99.0.1"])
_DNS = FakeDns(_STORE, FakeIpFilter(["+.lan", "*.corp.example", "time?.example"]))


def _check_reply(data: bytes, reply: bytes) -> None:
    record = DNSRecord.parse(reply)
    (qid,) = struct.unpack_from("!H", data)
    assert record.header.qr == 1 and record.header.id == qid, "reply header"
    name = normalize_name(str(record.q.qname))
    for rr in record.rr:
        if rr.rtype in (QTYPE.A, QTYPE.AAAA):
            ip = ipaddress.ip_address(str(rr.rdata))
            assert _STORE.lookup_ip(ip) == name, f"{ip} does not map back to {name!r}"


def _check_framer(data: bytes) -> None:
    whole, split = DnsTcpFramer(), DnsTcpFramer()
    whole.receive_data(data)
    cut = data[0] % (len(data) + 1) if data else 0
    split.receive_data(data[:cut])
    got_split = []
    while (message := split.next_message()) is not None:
        got_split.append(message)
    split.receive_data(data[cut:])
    while (message := split.next_message()) is not None:
        got_split.append(message)
    got_whole = []
    while (message := whole.next_message()) is not None:
        got_whole.append(message)
    assert got_whole == got_split, "framing depends on chunking"


def TestOneInput(data: bytes) -> None:  # The name atheris calls.
    """Feed `data` to the fake DNS and the TCP framer; raise on any broken invariant."""
    try:
        answer = _DNS.handle_query_untrusted(data)
    except BadDnsQuery as exc:
        if exc.formerr is not None:
            _check_reply(data, exc.formerr)
    else:
        if isinstance(answer, DnsReply):
            _check_reply(data, answer.data)
        else:
            assert isinstance(answer, DnsForward) and answer.query == data
    if len(data) < 4 * 65537:
        _check_framer(data)
    FakeDns.servfail(data)
    truncated = truncate_for_udp(data, 512)
    assert truncated == data or len(truncated) <= 512, "truncation did not fit"


def _seeds() -> dict[str, bytes]:
    def query(name: str, qtype: str, *, edns: bool = False, rd: int = 1) -> bytes:
        q = DNSRecord.question(name, qtype)
        q.header.id = 0xBEEF
        q.header.rd = rd
        if edns:
            q.add_ar(EDNS0(udp_len=4096))
        return bytes(q.pack())

    seeds = {
        "a": query("www.example.com", "A"),
        "a-edns": query("WWW.Example.COM.", "A", edns=True),
        "aaaa": query("ipv6.example", "AAAA"),
        "https": query("www.example.com", "HTTPS"),
        "txt": query("example.com", "TXT"),
        "mx": query("example.com", "MX"),
        "srv": query("_sip._tcp.example.com", "SRV"),
        "filtered": query("printer.lan", "A", rd=0),
        "ptr-fake": query("2.0.99.10.in-addr.arpa", "PTR"),
        "ptr-v6": query(ipaddress.IPv6Address("fd00::2").reverse_pointer, "PTR"),
        "ptr-real": query("8.8.8.8.in-addr.arpa", "PTR"),
        "root": query(".", "NS"),
        "short": b"\xbe\xef\x01",
        "response": bytes(DNSRecord.parse(query("r.example", "A")).reply().pack()),
    }
    two = bytearray(seeds["a"])
    two[5] = 2
    seeds["two-questions"] = bytes(two)
    seeds["truncated"] = seeds["a"][:-3]
    seeds["tcp-pipelined"] = DnsTcpFramer.frame(seeds["a"]) + DnsTcpFramer.frame(seeds["aaaa"])
    return seeds


def main(argv: list[str]) -> int:
    if argv[1:] != ["--write-seeds"]:
        print("usage: python -m fuzz.dns_query --write-seeds", file=sys.stderr)
        return 2
    directory = Path(__file__).resolve().parent / "corpus" / "dns_query"
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in _seeds().items():
        (directory / name).write_bytes(data)
        TestOneInput(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
