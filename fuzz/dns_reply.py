"""Fuzz harness for what upstream DNS servers send back: every byte string.

Two readers take untrusted replies: the direct outbound's resolver
(`parse_reply_untrusted`) and the memory of which name a real address was
answered for (`RealNames.record_response_untrusted`). Invariants:

* the resolver's parser returns or raises `BadDnsAnswer`, nothing else, and
  what it returns is sane: addresses of the asked family only, no
  duplicates, a TTL that is not negative;
* `RealNames` never raises, and every address it recorded maps back to the
  name of the reply's question.

The reply's own first two bytes are used as the expected ID, so inputs get
past the ID check and reach the parser. Seeds live in
`fuzz/corpus/dns_reply/`; regenerate them with
`python -m fuzz.dns_reply --write-seeds`.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from pathlib import Path

from dnslib import AAAA, CNAME, QTYPE, RR, SOA, A, DNSRecord

from outbounds.resolver import BadDnsAnswer, build_query, parse_reply_untrusted
from tun2sx.naming.fakeip import normalize_name
from tun2sx.naming.realnames import RealNames

_NAME = "www.example.com"


def TestOneInput(data: bytes) -> None:  # The name atheris calls.
    """Feed `data` to both reply readers; raise on any broken invariant."""
    qid = struct.unpack_from("!H", data)[0] if len(data) >= 2 else 0
    for qtype in (QTYPE.A, QTYPE.AAAA):
        try:
            reply = parse_reply_untrusted(data, qid, _NAME, qtype)
        except BadDnsAnswer:
            continue
        version = 4 if qtype == QTYPE.A else 6
        assert all(a.version == version for a in reply.addresses), "wrong family"
        assert len(set(reply.addresses)) == len(reply.addresses), "duplicate address"
        assert reply.ttl >= 0, "negative TTL"
    names = RealNames(capacity=8)
    if names.record_response_untrusted(data, now=0.0):
        record = DNSRecord.parse(data)
        name = normalize_name(str(record.q.qname))
        for rr in record.rr:
            if rr.rtype in (QTYPE.A, QTYPE.AAAA):
                found = names.name_for(ipaddress.ip_address(str(rr.rdata)), 1.0)
                assert found in (name, None), f"{rr.rdata} maps to {found!r}, not {name!r}"


def _seeds() -> dict[str, bytes]:
    def reply(qtype: int, *records: RR, rcode: int = 0, soa: bool = False) -> bytes:
        record = DNSRecord.parse(build_query(_NAME, qtype, 0xBEEF)).reply()
        record.header.rcode = rcode
        for rr in records:
            record.add_answer(rr)
        if soa:
            times = (1, 3600, 600, 86400, 30)
            record.add_auth(RR("example.com", QTYPE.SOA, rdata=SOA("ns", "admin", times), ttl=60))
        return bytes(record.pack())

    a = RR(_NAME, QTYPE.A, rdata=A("192.0.2.1"), ttl=60)
    aaaa = RR(_NAME, QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=60)
    alias = RR(_NAME, QTYPE.CNAME, rdata=CNAME("edge.example.net"), ttl=30)
    edge = RR("edge.example.net", QTYPE.A, rdata=A("192.0.2.2"), ttl=20)
    seeds = {
        "a": reply(QTYPE.A, a),
        "aaaa": reply(QTYPE.AAAA, aaaa),
        "cname": reply(QTYPE.A, alias, edge),
        "nxdomain": reply(QTYPE.A, rcode=3, soa=True),
        "nodata": reply(QTYPE.AAAA, soa=True),
        "servfail": reply(QTYPE.A, rcode=2),
    }
    truncated = bytearray(seeds["a"])
    truncated[2] |= 0x02
    seeds["tc"] = bytes(truncated)
    seeds["cut"] = seeds["cname"][:-5]
    return seeds


def main(argv: list[str]) -> int:
    if argv[1:] != ["--write-seeds"]:
        print("usage: python -m fuzz.dns_reply --write-seeds", file=sys.stderr)
        return 2
    directory = Path(__file__).resolve().parent / "corpus" / "dns_reply"
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in _seeds().items():
        (directory / name).write_bytes(data)
        TestOneInput(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
