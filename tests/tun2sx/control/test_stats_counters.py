"""/stats and the embedding API's `stats()` show one set of counters.

A user reading `curl 127.0.0.1:9090/stats` and an app reading
`handle.stats()` look at the same instance; both get the engine's counters
with the TUN's packets and bytes, `flows` and `drops`. The device is a real
`TunDevice` over a SOCK_SEQPACKET socketpair (one message per packet, as on
a TUN), so its own counting is what is checked; the traffic is one DNS
query answered from the fake-IP table.
"""

from __future__ import annotations

import functools
import json
import socket

import dnslib
import pytest
import trio

from stack.wire.packet import build_udp_packet, parse_packet_untrusted
from stack.wire.udp import UdpHeader
from tun2sx.control import api, app
from tun2sx.control.stats import open_stats_listeners, summary_line
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice

APP = socket.inet_aton("10.0.0.2")
RESOLVER = socket.inet_aton("198.18.0.2")


async def get_stats(port: int) -> dict[str, int]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    stats: dict[str, int] = json.loads(body)
    return stats


async def test_stats_endpoint_and_embedding_snapshot_carry_the_same_counters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    listeners: list[trio.SocketListener] = []

    async def recording_listeners(
        host: str, port: int, *, any_address: bool = False
    ) -> list[trio.SocketListener]:
        listeners.extend(await open_stats_listeners(host, port))
        return listeners

    settings = app.Settings(
        fake_ip_db=":memory:", stats_interval=0, stats_listen="127.0.0.1:0", outbound="direct://"
    )
    query = build_udp_packet(
        APP, RESOLVER, 40000, 53, dnslib.DNSRecord.question("example.com", "A").pack()
    )
    monkeypatch.setattr(app, "open_stats_listeners", recording_listeners)
    with trio.socket.from_stdlib_socket(theirs) as app_sock:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(app.serve, settings, device=device, handle_signals=False)
            engine: Engine = await nursery.start(serve)
            with trio.fail_after(10):
                await app_sock.send(query)
                answer = await app_sock.recv(65536)
                stats = await get_stats(listeners[0].socket.getsockname()[1])
                # What `Tun2sx.stats()` returns, taken the same way.
                snapshot = api._snapshot(engine, device)
            nursery.cancel_scope.cancel()

    assert isinstance(parse_packet_untrusted(memoryview(answer)).l4, UdpHeader)
    assert stats == snapshot
    assert {
        "tun_rx_packets": stats["tun_rx_packets"],
        "tun_rx_bytes": stats["tun_rx_bytes"],
        "tun_tx_packets": stats["tun_tx_packets"],
        "tun_tx_bytes": stats["tun_tx_bytes"],
        "flows": stats["flows"],
        "drops": stats["drops"],
    } == {
        "tun_rx_packets": 1,
        "tun_rx_bytes": len(query),
        "tun_tx_packets": 1,
        "tun_tx_bytes": len(answer),
        "flows": 0,
        "drops": 0,
    }


def test_the_summary_line_counts_each_drop_once_beside_the_total() -> None:
    before = {"udp_send_drops": 1, "drops": 1}
    now = {"udp_send_drops": 3, "tun_tx_drops": 1, "drops": 4}
    assert summary_line(now, before).endswith("drops 4 (+3: tun_tx_drops +1, udp_send_drops +2)")
