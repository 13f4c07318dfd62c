"""The fake-IP store (pools, LRU recycling, persistence) and the fake-IP filter."""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tun2sx.naming.fakeip import FakeIpFilter, FakeIpStore, _Pool, normalize_name

V4, V6 = socket.AF_INET, socket.AF_INET6


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_default_pools_and_case_insensitivity() -> None:
    store = FakeIpStore()
    a = store.allocate("Example.COM.", V4)
    assert a == ip("198.18.0.1")
    assert store.allocate("example.com", V4) == a
    assert store.lookup_ip(a) == "example.com"
    aaaa = store.allocate("EXAMPLE.com", V6)
    assert aaaa == ip("fc00::1")
    assert store.lookup_ip(aaaa) == "example.com"
    assert store.lookup_name("example.COM", V4) == a
    assert store.contains(ip("198.19.255.255")) and not store.contains(ip("198.20.0.0"))
    assert store.contains(ip("fc00:3fff::1")) and not store.contains(ip("fc00:4000::"))
    assert store.lookup_ip(ip("198.18.0.200")) is None
    assert store.lookup_ip(ip("10.0.0.1")) is None
    stats = store.statistics()
    assert (stats.v4_mappings, stats.v6_mappings, stats.v4_capacity) == (1, 1, 131070)
    assert stats.lookup_misses == 2
    store.close()
    store.close()


def test_non_ascii_case_is_kept() -> None:
    # DNS compares case-insensitively in ASCII only (RFC 4343).
    assert normalize_name("ÄBC.Example.") == "Äbc.example"


def test_reserved_network_and_last_addresses_never_handed_out() -> None:
    # /29: .0 network, .7 last, .1 gateway -> .2 .. .6 usable (5 addresses).
    store = FakeIpStore(v4_pool="10.99.0.0/29", reserved=["10.99.0.1"], v6_pool=None)
    handed = [store.allocate(f"n{i}.test", V4) for i in range(12)]
    assert {str(a) for a in handed} == {f"10.99.0.{i}" for i in range(2, 7)}
    assert store.statistics().v4_capacity == 5
    with pytest.raises(ValueError, match="no fake-IP pool"):
        store.allocate("x.test", V6)
    assert not store.contains(ip("fc00::1"))


def test_pool_without_usable_addresses_is_refused() -> None:
    # /30: .1 and .2 are the only candidates, and both are reserved.
    with pytest.raises(ValueError, match="no address left"):
        FakeIpStore(v4_pool="10.99.0.0/30", reserved=["10.99.0.1", "10.99.0.2"])


def test_lru_recycling_respects_lookups() -> None:
    store = FakeIpStore(v4_pool="10.99.0.0/29", reserved=["10.99.0.1"])
    first = {f"n{i}": store.allocate(f"n{i}", V4) for i in range(5)}  # pool now full
    # Use n0 (by ip) and n1 (by name): n2 becomes least recently used.
    assert store.lookup_ip(first["n0"]) == "n0"
    store.allocate("n1", V4)
    new = store.allocate("fresh", V4)
    assert new == first["n2"]
    assert store.lookup_ip(new) == "fresh"
    assert store.lookup_name("n2", V4) is None
    # The next recycled is n3, then n4, then n0.
    assert store.allocate("fresh2", V4) == first["n3"]
    assert store.allocate("fresh3", V4) == first["n4"]
    assert store.allocate("fresh4", V4) == first["n0"]
    stats = store.statistics()
    assert stats.recycled == 4 and stats.v4_mappings == 5


def test_persistence_across_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "fakeip.sqlite")
    store = FakeIpStore(path)
    names = [f"host{i}.example" for i in range(300)]
    before = {n: (store.allocate(n, V4), store.allocate(n, V6)) for n in names}
    store.lookup_ip(before["host0.example"][0])  # a recency update, flushed on close
    store.close()

    again = FakeIpStore(path)
    for name, (a, aaaa) in before.items():
        assert again.lookup_ip(a) == name
        assert again.lookup_ip(aaaa) == name
        assert again.allocate(name.upper(), V4) == a
    # New names continue after the old ones rather than reusing their addresses.
    assert again.allocate("new.example", V4) not in {a for a, _ in before.values()}
    assert again.statistics().v4_mappings == 301
    again.close()


def test_persisted_lru_order_survives_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "lru.sqlite")
    store = FakeIpStore(path, v4_pool="10.99.0.0/29")
    first = [store.allocate(f"n{i}", V4) for i in range(5)]  # .1 .. .5 ; .6 free
    store.lookup_ip(first[0])
    store.close()
    again = FakeIpStore(path, v4_pool="10.99.0.0/29")
    assert again.allocate("sixth", V4) == ip("10.99.0.6")
    # n1 is now the least recently used (n0 was looked up before the restart).
    assert again.allocate("seventh", V4) == first[1]
    again.close()


def test_pool_change_drops_mappings_outside(tmp_path: Path) -> None:
    path = str(tmp_path / "change.sqlite")
    store = FakeIpStore(path)
    kept = store.allocate("kept", V4)
    store.allocate("v6only", V6)
    store.close()
    again = FakeIpStore(path, v6_pool=None, reserved=[kept])
    assert again.lookup_ip(kept) is None  # now reserved
    assert again.statistics().v4_mappings == 0
    assert again.allocate("kept", V4) != kept
    again.close()


def test_rough_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a timing assertion: prints allocations/s for the report."""
    store = FakeIpStore(str(tmp_path / "speed.sqlite"))
    start = time.perf_counter()
    for i in range(2000):
        store.allocate(f"name{i}.example", V4)
    elapsed = time.perf_counter() - start
    store.close()
    with capsys.disabled():
        print(f"\nfake-IP store: {2000 / elapsed:.0f} new names/s (file, journal)")


@given(st.lists(st.text(alphabet="abcXYZ.-", min_size=1, max_size=12), max_size=40))
def test_bijection_under_recycling(names: list[str]) -> None:
    store = FakeIpStore(v4_pool="10.99.0.0/28", v6_pool=None)
    for name in names:
        addr = store.allocate(name, V4)
        assert store.lookup_ip(addr) == normalize_name(name)
    pool = store.v4
    assert len(pool.lru) == len(pool.by_name) <= pool.capacity
    assert {pool.by_name[n] for n in pool.lru.values()} == set(pool.lru)
    store.close()


FILTER = FakeIpFilter(
    ["+.lan", ".corp.example", "*.one.example", "exact.example", "stun.*.*", "time?.apple.com"]
)


@pytest.mark.parametrize(
    ("name", "matched"),
    [
        ("lan", True),
        ("printer.lan", True),
        ("a.b.LAN.", True),
        ("plan", False),
        ("corp.example", False),
        ("x.corp.example", True),
        ("x.y.corp.example", True),
        ("one.example", False),
        ("a.one.example", True),
        ("a.b.one.example", False),
        ("exact.example", True),
        ("sub.exact.example", False),
        ("stun.l.google", True),
        ("stun.l.google.com", False),
        ("time1.apple.com", True),
        ("time.apple.com", False),
        ("timex.apple.com.evil", False),
    ],
)
def test_filter(name: str, matched: bool) -> None:
    assert FILTER.matches(name) is matched


def test_filter_rejects_empty_patterns() -> None:
    for bad in ("", "+.", "."):
        with pytest.raises(ValueError, match="empty"):
            FakeIpFilter([bad])


@st.composite
def _pool_and_addresses(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """A pool (v4 or v6) and packet-field addresses in, around and outside it."""
    v6 = draw(st.booleans())
    width, bits = (16, 128) if v6 else (4, 32)
    prefix = draw(st.integers(bits - 12, bits - 2))
    base = draw(st.integers(0, 2**bits - 1)) >> (bits - prefix) << (bits - prefix)
    size = 2 ** (bits - prefix)
    near = st.integers(max(0, base - 3), min(2**bits - 1, base + size + 2))
    ints = draw(st.lists(st.one_of(near, st.integers(0, 2**bits - 1)), max_size=20))
    # An address of the other family never matches a pool of this one.
    other = draw(st.lists(st.binary(min_size=20 - width, max_size=20 - width), max_size=2))
    net = ipaddress.ip_network((base, prefix))
    return str(net), [i.to_bytes(width, "big") for i in ints] + other


@given(
    _pool_and_addresses(),
    st.lists(st.text(alphabet="abcXYZ.-", min_size=1, max_size=8), max_size=5),
)
def test_lookup_on_packet_bytes_agrees_with_address_objects(
    case: tuple[str, list[bytes]], names: list[str]
) -> None:
    pool, addresses = case
    net = ipaddress.ip_network(pool)
    v6 = net.version == 6
    store = FakeIpStore(
        v4_pool="198.18.0.0/15" if v6 else pool, v6_pool=pool if v6 else "fd00:7e::/112"
    )
    family = socket.AF_INET6 if v6 else socket.AF_INET
    handed = {store.allocate(name, family): normalize_name(name) for name in names}
    for packed in addresses + [ip.packed for ip in handed]:
        ip = ipaddress.ip_address(packed)
        inside = ip.version == net.version and ip in net
        assert store.contains_packed(packed) == inside
        assert store.lookup_packed(packed) == (handed.get(ip) if inside else None)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**128 - 1))
def test_a_pools_packed_address_is_the_address_packed(v4: int, v6: int) -> None:
    for network in ("10.0.0.0/8", "198.18.0.0/15", "fc00::/18", "fd00::/124"):
        pool = _Pool(ipaddress.ip_network(network), set())
        offset = (v4 if pool.width == 4 else v6) % pool.network.num_addresses
        assert pool.packed(offset) == pool.address(offset).packed
