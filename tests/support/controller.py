"""What the controller's tests share: a fake engine and group, and clients
that speak HTTP (h11) and WebSocket (wsproto) to a running controller."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import h11
import trio
import wsproto
import wsproto.events

from outbounds.base import Destination, Outbound
from outbounds.direct import DirectOutbound
from tun2sx.control.controller import Controller, serve_controller
from tun2sx.dataplane.context import ConnectTimes, FlowInfo
from tun2sx.naming.dns import FakeDns
from tun2sx.naming.fakeip import FakeIpStore
from tun2sx.naming.router import Router, RuleSet, parse_rules, rule_label


class FakeGroup:
    """A select group over `members`, as outbounds.group.ProxyGroup is seen."""

    def __init__(self, name: str, members: tuple[str, ...], kind: str = "select") -> None:
        self.name = name
        self.kind = kind
        self.members = members
        self.chosen = members[0]
        self.history: dict[str, list[tuple[float, int]]] = {}
        self.down: set[str] = set()

    def now(self) -> str:
        return self.chosen

    def select(self, member: str) -> None:
        if self.kind != "select":
            raise ValueError(f"{self.name} is a {self.kind} group")
        if member not in self.members:
            raise ValueError(f"{self.name} has no member {member!r}")
        self.chosen = member

    def delays(self, member: str) -> list[tuple[float, int]]:
        return self.history.get(member, [])

    def alive(self, member: str) -> bool:
        return member not in self.down

    async def connect_tcp(self, dest: Destination) -> Any:
        raise NotImplementedError

    async def open_udp(self) -> Any:
        raise NotImplementedError


class FakeEngine:
    """The engine as the controller reads it: flows, counters, router."""

    def __init__(self, rules: tuple[str, ...] = ("DOMAIN-SUFFIX,example.com,proxy",)) -> None:
        direct = DirectOutbound()
        group = FakeGroup("proxy", ("DIRECT", "REJECT"))
        outbounds: dict[str, Outbound] = {"DIRECT": direct, "proxy": group}  # type: ignore[dict-item]
        self.group = group
        self.router = Router(direct, RuleSet(parse_rules(rules, outbounds)), outbounds)
        self.flows: set[FlowInfo] = set()
        self.counters = {"tcp_flows": 0, "tcp_flows_started": 0, "bytes_up": 0, "bytes_down": 0}
        self.connect_times = ConnectTimes()
        self.override: str | None = None
        self.dns: FakeDns | None = None
        self.fakeip: FakeIpStore | None = None
        self.closed: list[str] = []

    def statistics(self) -> dict[str, int]:
        stats = dict(self.counters)
        stats["bytes_up"] += sum(f.bytes_up for f in self.flows)
        stats["bytes_down"] += sum(f.bytes_down for f in self.flows)
        return stats

    def add_flow(self, host: str, port: int = 443, up: int = 0, down: int = 0) -> FlowInfo:
        dest = Destination.parse_host(host, port)
        # As the engine records it: the rule that routed the flow.
        kind, payload = rule_label(self.router.rule_for(dest, "tcp"))
        info = FlowInfo("tcp", "10.0.0.2:40000", dest, "proxy", 0, rule=kind, rule_payload=payload)
        info.wall_started = 1_700_000_000.25
        info.bytes_up, info.bytes_down = up, down

        def close() -> None:
            self.closed.append(info.id)
            self.flows.discard(info)

        info.closer = close
        self.flows.add(info)
        return info


async def start_controller(
    nursery: trio.Nursery, controller: Controller, host: str = "127.0.0.1"
) -> int:
    """Serve `controller` on a free loopback port; the port."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    await nursery.start(serve_controller, controller, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def request(
    port: int,
    method: str,
    path: str,
    *,
    body: object = None,
    headers: Collection[tuple[str, str]] = (),
    host: str = "127.0.0.1",
) -> Response:
    """One request over a fresh connection (h11 on the client side)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        data = b"" if body is None else json.dumps(body).encode()
        head = [("Host", host), ("Connection", "close"), *headers]
        if body is not None:
            head.append(("Content-Length", str(len(data))))
        await stream.send_all(client.send(h11.Request(method=method, target=path, headers=head)))
        if data:
            await stream.send_all(client.send(h11.Data(data=data)))
        await stream.send_all(client.send(h11.EndOfMessage()))
        status, got, chunks = 0, {}, []
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                got = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return Response(status, got, b"".join(chunks))


async def read_lines(port: int, path: str, count: int, headers: Collection[tuple[str, str]] = ()):
    """The first `count` JSON lines of a chunked stream."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        head = [("Host", "127.0.0.1"), *headers]
        await stream.send_all(client.send(h11.Request(method="GET", target=path, headers=head)))
        await stream.send_all(client.send(h11.EndOfMessage()))
        buffer, lines = b"", []
        while len(lines) < count:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200, event
            elif isinstance(event, h11.Data):
                buffer += bytes(event.data)
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    lines.append(json.loads(line))
            else:
                raise AssertionError(f"stream ended: {event}")
        return lines[:count]


class WebSocket:
    """A WebSocket client over trio with wsproto."""

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream = stream
        self.ws = ws

    @classmethod
    async def open(cls, port: int, target: str, headers: Collection[tuple[str, str]] = ()):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extra = [(k.encode(), v.encode()) for k, v in headers]
        await stream.send_all(
            ws.send(wsproto.events.Request(host="127.0.0.1", target=target, extra_headers=extra))
        )
        self = cls(stream, ws)
        event = await self._next()
        if not isinstance(event, wsproto.events.AcceptConnection):
            await stream.aclose()
            raise ConnectionRefusedError(f"refused: {event}")
        return self

    async def _next(self) -> wsproto.events.Event:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)

    async def receive_json(self) -> Any:
        text = ""
        while True:
            event = await self._next()
            if isinstance(event, wsproto.events.TextMessage):
                text += event.data
                if event.message_finished:
                    return json.loads(text)
            elif isinstance(event, wsproto.events.CloseConnection):
                raise EOFError(event.code)

    async def close(self) -> None:
        await self.stream.send_all(self.ws.send(wsproto.events.CloseConnection(code=1000)))
        await self.stream.aclose()
