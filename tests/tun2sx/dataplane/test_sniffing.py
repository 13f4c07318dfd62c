"""Sniffed flows through the engine: the name routes, the bytes go on.

TCP: a real `TunDevice` on a SOCK_SEQPACKET socketpair, the application
played by the stack's own `TcpConnection` (tests.support.app), outbounds
in memory that record what they were asked to connect to. UDP: QUIC
Initials from aioquic fed as packets to a stand-in device. Time is trio's
autojump clock.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from dnslib import QTYPE, RR, A, DNSRecord

from outbounds.base import Destination, FailureReply, OutboundError, UdpDrops, UdpSession
from stack.netstack import NetStack, NetStackConfig
from stack.wire.packet import build_udp_packet
from tests.support.app import APP, CONFIG, REMOTE, AppSide
from tests.support.hellos import quic_initials, split_records, tls_client_hello
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.splice import splice
from tun2sx.dataplane.tcpstream import TcpStream
from tun2sx.dataplane.tun import RxPacket, TunDevice
from tun2sx.naming.fakeip import FakeIpStore
from tun2sx.naming.router import Router, RuleSet, parse_rules
from tun2sx.naming.sniff import SniffConfig

REMOTE_IP = ipaddress.ip_address(socket.inet_ntoa(REMOTE))
RULES = ["DOMAIN-SUFFIX,example.org,named", "DOMAIN,blocked.example,REJECT"]


class Recording:
    """An outbound whose TCP flows reach an in-memory server.

    The server echoes, or first sends `banner` (a server that speaks first).
    """

    def __init__(self, name: str, nursery: trio.Nursery, banner: bytes = b"") -> None:
        self.name = name
        self._nursery = nursery
        self.banner = banner
        self.tcp: list[Destination] = []
        self.udp: list[FakeSession] = []
        self.failure: str | None = None  # "refuse" or "hang"

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        self.tcp.append(dest)
        if self.failure == "refuse":
            raise OutboundError(FailureReply.RESET, "connection refused")
        if self.failure == "hang":
            await trio.sleep_forever()
        ours, theirs = trio.testing.memory_stream_pair()

        async def serve() -> None:
            if self.banner:
                await theirs.send_all(self.banner)
            while data := await theirs.receive_some():
                await theirs.send_all(data)
            await theirs.send_eof()

        self._nursery.start_soon(serve)
        return ours

    async def open_udp(self) -> UdpSession:
        session = FakeSession()
        self.udp.append(session)
        return session


class FakeSession:
    """A UDP session that records what was sent and never answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Destination]] = []

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        self.sent.append((data, dest))
        return True

    async def send_to(self, data: bytes, dest: Destination) -> None:
        self.sent.append((data, dest))

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def receive_from(self) -> tuple[bytes, Destination]:
        raise NotImplementedError

    async def wait_ended(self) -> None:
        await trio.sleep_forever()

    def drops(self) -> UdpDrops:
        return UdpDrops(0, 0, 0)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define
class Lab:
    engine: Engine
    named: Recording
    default: Recording
    sock: trio.socket.SocketType
    seen: list[tuple[str | None, str, str]]  # (sniffed, host_source, outbound) of each flow

    def app(self, port: int) -> AppSide:
        return AppSide(self.sock, remote_port=port)


def make_engine(
    device: object,
    nursery: trio.Nursery,
    sniff: SniffConfig,
    banner: bytes = b"",
    fakeip: FakeIpStore | None = None,
) -> tuple[Engine, Recording, Recording, list[tuple[str | None, str, str]]]:
    named, default = Recording("named", nursery, banner), Recording("default", nursery, banner)
    router = Router(
        default,
        RuleSet(parse_rules(RULES, ["named"])),
        {"named": named},
        default_name="default",
    )
    seen: list[tuple[str | None, str, str]] = []
    engine: Engine

    async def handler(stream: TcpStream, upstream: trio.abc.HalfCloseableStream) -> None:
        seen.extend((f.sniffed, f.host_source, f.outbound) for f in engine.flows)
        await splice(stream, upstream, 65536)

    engine = Engine(
        device,  # type: ignore[arg-type]
        NetStack(NetStackConfig(tcp=CONFIG)),
        router,
        fakeip=fakeip,
        config=EngineConfig(sniff=sniff),
        tcp_handler=handler,
    )
    return engine, named, default, seen


@pytest.fixture
async def lab(nursery: trio.Nursery, request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    options = dict(getattr(request, "param", {}))
    banner = options.pop("banner", b"")
    fakeip = options.pop("fakeip", None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="fake0", mtu=1500, offload=False)
    sniff = SniffConfig(**{"mode": "route", **options})
    engine, named, default, seen = make_engine(device, nursery, sniff, banner, fakeip)
    await nursery.start(engine.run)
    with trio.socket.from_stdlib_socket(theirs) as sock:
        yield Lab(engine, named, default, sock, seen)
    device.close()


@pytest.mark.parametrize("record_size", [None, 1])
async def test_tls_sni_routes_by_name_and_the_hello_goes_on(
    lab: Lab, autojump_clock: trio.testing.MockClock, record_size: int | None
) -> None:
    hello = tls_client_hello("www.example.org")
    if record_size is not None:
        # One byte per record: 3 kB, over three of the application's
        # 1400-byte segments.
        hello = split_records(hello, record_size)
        assert len(hello) > 2 * 1400
    app = lab.app(443)
    echoed = await app.exchange(await app.handshake(), hello, len(hello))
    assert echoed == hello  # the bytes read while sniffing reached the server first
    assert lab.named.tcp == [Destination(REMOTE_IP, 443)]  # route mode: the address
    assert lab.default.tcp == []
    assert lab.seen == [("www.example.org", "sniffed", "named")]
    assert lab.engine.counters["sniffed_tls"] == 1


@pytest.mark.parametrize("lab", [{"mode": "override"}], indirect=True)
async def test_override_sends_the_name_to_the_outbound(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    request = b"GET / HTTP/1.1\r\nHost: api.example.org\r\n\r\n"
    app = lab.app(80)
    assert await app.exchange(await app.handshake(), request, len(request)) == request
    assert lab.named.tcp == [Destination("api.example.org", 80)]


async def test_unrecognised_first_bytes_go_on_unchanged(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    payload = b"\x00\x01 not a protocol we read" * 10
    app = lab.app(443)
    assert await app.exchange(await app.handshake(), payload, len(payload)) == payload
    assert lab.default.tcp == [Destination(REMOTE_IP, 443)]
    assert lab.seen == [(None, "none", "default")]
    assert lab.engine.counters["sniff_misses"] == 1


@pytest.mark.parametrize("lab", [{"banner": b"SSH-2.0-OpenSSH_9.2\r\n"}], indirect=True)
async def test_a_server_that_speaks_first_is_not_stalled(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    banner = b"SSH-2.0-OpenSSH_9.2\r\n"
    # Port 22 is no sniffing port: the banner comes at once.
    app = lab.app(22)
    start = trio.current_time()
    assert await app.exchange(await app.handshake(), b"", len(banner)) == banner
    assert trio.current_time() - start < 0.05
    # On a sniffing port, silence ends the wait after the time-out.
    app = AppSide(lab.sock, remote_port=8443)
    start = trio.current_time()
    assert await app.exchange(await app.handshake(), b"", len(banner)) == banner
    assert 0.3 <= trio.current_time() - start < 0.4
    assert lab.default.tcp == [Destination(REMOTE_IP, 22), Destination(REMOTE_IP, 8443)]


async def test_a_sniffed_name_that_is_rejected_is_reset(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    hello = tls_client_hello("blocked.example")
    app = lab.app(443)
    conn = await app.handshake()
    assert await app.exchange(conn, hello, 1) == b""
    assert lab.named.tcp == lab.default.tcp == []


@pytest.mark.parametrize("failure", ["refuse", "hang"])
async def test_a_sniffed_flow_whose_outbound_fails_is_reset_and_counted(
    lab: Lab, autojump_clock: trio.testing.MockClock, failure: str
) -> None:
    lab.named.failure = failure
    app = lab.app(443)
    conn = await app.handshake()
    start = trio.current_time()
    assert await app.exchange(conn, tls_client_hello("www.example.org"), 1) == b""
    assert lab.named.tcp == [Destination(REMOTE_IP, 443)]  # routed by the name
    assert lab.engine.counters["tcp_outbound_failed"] == 1
    waited = trio.current_time() - start
    if failure == "hang":
        assert waited == pytest.approx(lab.engine.config.connect_timeout, abs=0.5)
    else:
        assert waited < 1


async def test_a_name_from_dns_routes_what_sniffing_did_not_recognise(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    # A DNS answer forwarded upstream gave REMOTE for api.example.org.
    reply = DNSRecord.question("api.example.org", "A").reply()
    reply.add_answer(RR("api.example.org", QTYPE.A, rdata=A(str(REMOTE_IP)), ttl=600))
    lab.engine.real_names.record_response_untrusted(bytes(reply.pack()), trio.current_time())
    payload = b"\x00 no TLS, no HTTP"
    app = lab.app(443)
    assert await app.exchange(await app.handshake(), payload, len(payload)) == payload
    assert lab.named.tcp == [Destination(REMOTE_IP, 443)]
    assert lab.seen == [(None, "dns", "named")]


@pytest.mark.parametrize("lab", [{"mode": "off"}], indirect=True)
async def test_off_means_the_address_alone_decides(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    hello = tls_client_hello("www.example.org")
    app = lab.app(443)
    assert await app.exchange(await app.handshake(), hello, len(hello)) == hello
    assert lab.default.tcp == [Destination(REMOTE_IP, 443)]
    assert lab.seen == [(None, "none", "default")]


def fake_ip_for(name: str) -> tuple[FakeIpStore, bytes]:
    store = FakeIpStore(":memory:")
    return store, store.allocate(name, socket.AF_INET).packed


STORE, FAKE = fake_ip_for("cdn.example.net")


@pytest.mark.parametrize(
    ("lab", "want"),
    [
        ({"fakeip": STORE}, ("default", None, "fake-ip")),
        ({"fakeip": STORE, "fake_ip": True}, ("named", "www.example.org", "sniffed")),
    ],
    indirect=["lab"],
)
async def test_fake_ip_flows_are_sniffed_only_when_asked(
    lab: Lab, want: tuple[str, str | None, str], autojump_clock: trio.testing.MockClock
) -> None:
    # The application resolved cdn.example.net (no rule) but its ClientHello
    # names www.example.org (a rule): with fake_ip = true that name decides.
    hello = tls_client_hello("www.example.org")
    app = AppSide(lab.sock, remote=FAKE, remote_port=443)
    assert await app.exchange(await app.handshake(), hello, len(hello)) == hello
    outbound, sniffed, source = want
    carrier = lab.named if outbound == "named" else lab.default
    assert carrier.tcp == [Destination("cdn.example.net", 443)]  # route mode: the fake IP's name
    assert lab.seen == [(sniffed, source, outbound)]


# -- QUIC -------------------------------------------------------------------


class PacketTun:
    """Batches in from the test; what the engine writes is dropped."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[list[RxPacket]](100)

    def feed(self, *packets: bytes) -> None:
        self._send.send_nowait([RxPacket(memoryview(p), False) for p in packets])

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        return []  # nothing held outside read_batch

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        return await self._receive.receive()

    def write(self, packet: bytes) -> None:
        pass


def udp(payload: bytes, port: int = 443) -> bytes:
    return build_udp_packet(APP, REMOTE, 40000, port, payload)


@pytest.mark.parametrize("mode", ["route", "override"])
async def test_quic_initials_over_several_datagrams_route_by_name(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    device = PacketTun()
    engine, named, default, _ = make_engine(device, nursery, SniffConfig(mode=mode))  # type: ignore[arg-type]
    await nursery.start(engine.run)
    initials = quic_initials("video.example.org", alpn_padding=10)
    assert len(initials) == 3
    # The datagrams arrive apart: the session waits for all of them.
    for datagram in initials:
        device.feed(udp(datagram))
        await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert default.udp == []
    (session,) = named.udp
    want = "video.example.org" if mode == "override" else REMOTE_IP
    assert session.sent == [(d, Destination(want, 443)) for d in initials]
    (info,) = engine.flows
    assert (info.sniffed, info.host_source, info.outbound) == (
        "video.example.org",
        "sniffed",
        "named",
    )


async def test_udp_that_is_not_quic_waits_no_longer_than_the_time_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    device = PacketTun()
    engine, named, default, _ = make_engine(device, nursery, SniffConfig(mode="route"))
    await nursery.start(engine.run)
    start = trio.current_time()
    device.feed(udp(b"\x40 a short-header packet, or a game's datagram"))
    await trio.testing.wait_all_tasks_blocked()
    assert len(default.udp) == 1
    assert trio.current_time() == start  # recognised as not QUIC at once
    assert named.udp == []
    # A datagram that looks like the start of an Initial but never completes
    # is routed by the address once the time-out passes.
    device.feed(build_udp_packet(APP, REMOTE, 40001, 443, quic_initials(alpn_padding=10)[0]))
    await trio.sleep(0.29)
    assert len(default.udp) == 1
    await trio.sleep(0.02)
    assert len(default.udp) == 2
