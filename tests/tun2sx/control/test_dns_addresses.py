"""Where tun2sx answers DNS: its own TUN addresses always, others only when hijacking.

`--no-dns-hijack` is for a setup where applications' own resolvers (a
DoT/DoH client, a LAN server) must be reached: queries to them go out like
any flow. The address users write into resolv.conf (198.18.0.2 in the
docs) is tun2sx's own and keeps answering. `serve` runs on a stand-in
device; the outbound is a SOCKS5 proxy nobody listens for, so a query that
is not answered here comes back as the ICMP error of a failed flow.
"""

from __future__ import annotations

import functools
import socket

import dnslib
import pytest
import trio

from stack.tcp import NEED_DATA, DataReceived
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import build_udp_packet
from stack.wire.udp import UdpHeader
from tests.support import free_port
from tests.support.app import AppSide, MemoryTun
from tun2sx.control import app
from tun2sx.dataplane.tun import TunDevice

APP = socket.inet_aton("10.0.0.2")
APP_PORT = 40000
RESOLVER = socket.inet_aton("198.18.0.2")
ELSEWHERE = socket.inet_aton("192.0.2.53")


def query(dst: bytes, ident: int) -> bytes:
    request = dnslib.DNSRecord.question("example.com", "A")
    request.header.id = ident
    return build_udp_packet(APP, dst, APP_PORT, 53, request.pack())


async def answers(settings: app.Settings, dst: bytes) -> bool:
    """Send a query to `dst`:53 through `serve`; True when DNS answers it."""
    device = MemoryTun()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(app.serve, settings, device=device, handle_signals=False)
        await nursery.start(serve)  # type: ignore[arg-type]
        device.feed(query(dst, 7))
        with trio.fail_after(10):
            reply = await device.next_written()
        nursery.cancel_scope.cancel()
    if isinstance(reply.l4, UdpHeader):
        assert (reply.src, reply.l4.src_port) == (dst, 53)
        record = dnslib.DNSRecord.parse(bytes(reply.payload))
        assert record.header.id == 7 and record.rr
        return True
    assert isinstance(reply.l4, IcmpHeader), reply
    return False


def settings(hijack: bool) -> app.Settings:
    return app.Settings(
        fake_ip_db=":memory:",
        stats_interval=0,
        outbound=f"socks5://127.0.0.1:{free_port()}",
        dns_hijack=hijack,
    )


@pytest.mark.parametrize("hijack", [True, False])
async def test_the_resolver_address_answers_with_or_without_hijack(hijack: bool) -> None:
    assert await answers(settings(hijack), RESOLVER)


async def test_without_hijack_other_addresses_are_not_answered() -> None:
    assert await answers(settings(True), ELSEWHERE)
    assert not await answers(settings(False), ELSEWHERE)


def test_own_addresses_are_the_pools_first_three_and_the_tun_addresses() -> None:
    own = app.own_addresses(app.Settings(tun_addresses=("10.9.0.1/24",), fake_ip_range6=None))
    assert [str(ip) for ip in own] == ["198.18.0.1", "198.18.0.2", "198.18.0.3", "10.9.0.1"]


async def test_the_resolver_address_answers_over_tcp_without_hijack() -> None:
    """A resolver falls back to TCP for a truncated answer; that must reach us too."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    request = dnslib.DNSRecord.question("example.com", "A")
    request.header.id = 9
    wire = request.pack()
    # The application's socket closes after tun2sx stopped: its parting
    # RST must have somewhere to go.
    with trio.socket.from_stdlib_socket(theirs) as sock:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                app.serve, settings(False), device=device, handle_signals=False
            )
            await nursery.start(serve)
            side = AppSide(sock, remote=RESOLVER, remote_port=53)
            with trio.fail_after(10):
                conn = await side.handshake()
                conn.send(len(wire).to_bytes(2, "big") + wire)
                received = bytearray()
                while len(received) < 2 or len(received) < 2 + int.from_bytes(received[:2], "big"):
                    for hdr, data in conn.segments_to_send(trio.current_time()):
                        await side.send(hdr, data)
                    hdr, data = await side.receive()
                    conn.segment_received(hdr, data, trio.current_time())
                    while (event := conn.next_event()) is not NEED_DATA:
                        if isinstance(event, DataReceived):
                            received += event.data
            nursery.cancel_scope.cancel()
    answer = dnslib.DNSRecord.parse(bytes(received[2:]))
    assert answer.header.id == 9 and answer.rr
