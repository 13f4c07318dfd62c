"""Fuzz IP reassembly (`stack.fragments.FragmentStore`) with honest and hostile pieces.

Each input is a little program. A step either lets time pass (time-outs
fire), feeds raw bytes as a fragment, or cuts an honest UDP datagram (IPv4
or IPv6, size, identification and cut points from the input) into
fragments and feeds them in an order the input picks, possibly repeating
some (exact duplicates) and possibly corrupting one byte of one. The store's
limits are small so that eviction and refusal run too.

Invariants: `receive` and `handle_timeout` never raise; the memory held
never exceeds the limit; a datagram fed without corruption either comes
back exactly as it was cut, or was lost to a counted cause (eviction,
refusal, or junk fed earlier under the same key); and once every time-out has run, nothing is held.

`split` is also what the tests use to cut datagrams.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter

from fuzz.segments import ByteReader
from stack.fragments import FragmentConfig, FragmentStore
from stack.wire import ipv6
from stack.wire.fragment import Ipv6FragmentHeader, emit_ipv6_fragment_header
from stack.wire.ipv4 import FLAG_MF, emit_ipv4_header, parse_ipv4_untrusted
from stack.wire.packet import build_udp_packet

SRC4 = b"\x0a\x00\x00\x02"
DST4 = b"\xc6\x12\x00\x05"
SRC6 = b"\xfd\x00" + bytes(13) + b"\x02"
DST6 = b"\xfc\x00" + bytes(13) + b"\x05"
LIMITS = FragmentConfig(max_bytes=48_000, max_bytes_per_source=32_000)


def split(packet: bytes, cuts: list[int], ident: int) -> list[bytes]:
    """Cut an unfragmented IPv4 or IPv6 packet (no extension headers) into
    fragments at `cuts` (offsets into its data, multiples of 8, ascending)."""
    if packet[0] >> 4 == 4:
        header, _ = parse_ipv4_untrusted(memoryview(packet))
        hlen = (packet[0] & 0x0F) << 2
    else:
        hlen = ipv6.HEADER_LEN
    data = packet[hlen:]
    bounds = [0, *cuts, len(data)]
    out = []
    for start, stop in itertools.pairwise(bounds):
        more = stop < len(data)
        piece = data[start:stop]
        if packet[0] >> 4 == 4:
            head = header._replace(
                total_length=hlen + len(piece),
                ident=ident & 0xFFFF,
                flags=FLAG_MF if more else 0,
                frag_offset=start >> 3,
            )
            out.append(emit_ipv4_header(head) + piece)
        else:
            frag = emit_ipv6_fragment_header(Ipv6FragmentHeader(packet[6], start, more, ident))
            plen = (len(frag) + len(piece)).to_bytes(2, "big")
            out.append(packet[:4] + plen + bytes((ipv6.FRAGMENT,)) + packet[7:40] + frag + piece)
    return out


def _cuts(r: ByteReader, length: int) -> list[int]:
    cuts: set[int] = set()
    for _ in range(r.num(1) % 12):
        cut = (r.num(2) % max(length, 1)) & ~7
        if 0 < cut < length:
            cuts.add(cut)
    return sorted(cuts)


def _datagram_step(r: ByteReader, store: FragmentStore, now: float, ident: int) -> None:
    v6 = bool(r.num(1) & 1)
    size = r.num(2) % 4000
    payload = bytes((ident + i) & 0xFF for i in range(size))
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    packet = build_udp_packet(src, dst, 1000, 2000, payload)
    fragments = split(packet, _cuts(r, len(packet) - (40 if v6 else 20)), ident)
    order = list(range(len(fragments)))
    for i in range(len(order) - 1, 0, -1):  # the input shuffles
        j = r.num(1) % (i + 1)
        order[i], order[j] = order[j], order[i]
    order += [order[r.num(1) % len(order)] for _ in range(r.num(1) % 3)]
    corrupt = r.num(1) % 4 == 0
    if corrupt:
        victim = bytearray(fragments[r.num(1) % len(fragments)])
        victim[r.num(2) % len(victim)] ^= r.num(1) | 1
        fragments.append(bytes(victim))
        order.insert(r.num(1) % (len(order) + 1), len(fragments) - 1)
    lost = _losses(store)
    results = []
    for i in order:
        out = store.receive(memoryview(fragments[i]), now)
        assert store.held_bytes <= LIMITS.max_bytes
        if out is not None:
            results.append(out)
    if corrupt or len(fragments) == 1:
        return
    # Raw junk fed earlier may share the key (a counted overlap or bad
    # fragment then); otherwise the datagram comes back exactly.
    # (Repeats fed after it completed may make it once more.)
    assert all(same_datagram(out, packet) for out in results), "a different datagram came back"
    assert results or _losses(store) > lost, "the datagram was lost without a count"


def same_datagram(got: bytes, sent: bytes) -> bool:
    """Whether a reassembled packet is the datagram that was cut: the same
    bytes, but for an IPv4 header's identification, flags and checksum
    (the fragments' identification stays, as the kernel's does)."""
    if sent[0] >> 4 == 6:
        return got == sent
    return got[:4] == sent[:4] and got[8:10] == sent[8:10] and got[12:] == sent[12:]


def _losses(store: FragmentStore) -> int:
    counters = store.counters
    causes = ("frag_evicted", "frag_refused", "frag_overlaps", "frag_bad", "frag_after_discard")
    return sum(counters[c] for c in causes)


def TestOneInput(data: bytes) -> None:
    r = ByteReader(data)
    store = FragmentStore(LIMITS, Counter())
    now = 0.0
    ident = 0
    for _ in range(24):
        if not r.more():
            break
        op = r.num(1) % 4
        if op == 0:
            now += r.num(1)
            store.handle_timeout(now)
        elif op == 1:
            store.receive(memoryview(r.take(r.num(2) % 1600)), now)
        else:
            ident += 1
            _datagram_step(r, store, now, ident)
        assert store.held_bytes <= LIMITS.max_bytes
    store.handle_timeout(now + 3600)
    assert len(store) == 0 and store.held_bytes == 0, (len(store), store.held_bytes)


def write_seeds() -> None:
    """Write the seed corpus: in order, shuffled, duplicated, corrupted,
    raw junk, time-outs and a mixed one."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent / "corpus" / "reassembly"
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {
        # op, v6?, size, cut count, cuts..., shuffle bytes, extra copies, corrupt?
        "v4-in-order": b"\x02\x00\x0b\xb8\x03\x02\x00\x04\x00\x06\x00" + bytes(8) + b"\x01",
        "v6-shuffled": b"\x03\x01\x0f\xa0\x04\x01\x00\x03\x00\x05\x00\x08\x00"
        + b"\x03\x01\x02\x00\x00\x01",
        "v4-duplicates": b"\x02\x00\x07\xd0\x02\x02\x00\x05\x00\x01\x00\x02\x01\x02\x01",
        "v6-corrupt": b"\x02\x01\x05\xdc\x02\x02\x00\x04\x00\x00\x00\x00\x00"
        + b"\x00\x00\x01\x00\x30\x40\x01",
        "raw-junk": b"\x01\x00\x30"
        + bytes.fromhex("4500003000014000401100000a000002c6120005")
        + bytes(28),
        "timeouts": b"\x02\x00\x0b\xb8\x01\x02\x00\x00\x00\x00\x01\x00\x40\x00\xff\x00\x3c",
    }
    seeds["mixed"] = b"".join(seeds.values())
    for name, blob in seeds.items():
        (folder / name).write_bytes(blob)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-seeds"]:
        write_seeds()
    else:
        for arg in sys.argv[1:]:
            with open(arg, "rb") as f:
                TestOneInput(f.read())
