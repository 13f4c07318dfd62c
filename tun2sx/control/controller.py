"""The controller: a Clash/mihomo-compatible HTTP API on the stats address.

HTTP/1.1 is parsed by h11 and WebSocket frames by wsproto (both sans-I/O,
so this module only moves bytes and decides answers). Each connection is
one task: it reads a request (head and body bounded, a deadline on each),
answers it, and keeps the connection for the next one, or turns into a
stream: `/traffic`, `/memory`, `/logs` and `/connections` send a JSON
object per line over chunked HTTP, or a text message each over a
WebSocket when the request asks to upgrade.

Access: with a `secret`, every request but `/ui` and the CORS preflight
needs ``Authorization: Bearer SECRET`` (or ``?token=SECRET`` on a
WebSocket upgrade, as browsers cannot set headers there); without one,
only requests whose Host header names a loopback address are answered
(DNS rebinding) and CORS is granted to loopback origins only, since any
web page could otherwise read the connection list. With a secret, any
Host and any origin are allowed (the secret is what protects), which is
what hosted dashboards need.

Bounds: a request head of 8 KiB, a body of 64 KiB, 10 s to send a
request, 10 s for any write to a client (a client that reads slower than
a stream produces is dropped), 64 connections at once; a log stream that
falls behind loses lines rather than holding memory.
"""

from __future__ import annotations

import contextlib
import hmac
import http
import json
import logging
import math
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import attrs
import h11
import trio
import wsproto
import wsproto.connection
import wsproto.events
import wsproto.utilities

from outbounds.base import Outbound, OutboundError
from tun2sx.control import clashapi, metrics
from tun2sx.control.clashapi import ApiError, ApiState, Controlled
from tun2sx.control.stats import is_loopback_host
from tun2sx.naming.router import REJECT

log = logging.getLogger("tun2sx.controller")

MAX_HEAD = 8192
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
LOG_QUEUE = 256
MIN_INTERVAL = 0.1
MAX_INTERVAL = 3600.0  # an hour: more is a stream that never says anything
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type"
Reload = Callable[[str | None], Awaitable[str | None] | str | None]
# What the streams yield: JSON-ready objects, sent one per line or message.
Producer = Callable[[], AsyncGenerator[object, None]]


@attrs.frozen
class Request:
    """One request as the answering code sees it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    @property
    def websocket(self) -> bool:
        return (
            self.headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in self.headers.get("connection", "").lower()
        )


@attrs.frozen
class Reply:
    """A whole response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"


def json_reply(status: int, value: object) -> Reply:
    return Reply(status, json.dumps(value).encode() + b"\n")


def message(status: int, text: str) -> Reply:
    """Clash's error shape."""
    return json_reply(status, {"message": text})


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """Path (percent-decoded) and query of a request target.

    Raises:
        h11.RemoteProtocolError: a target urllib cannot split (an
            unbalanced `[`), answered 400 like any other bad request.
    """
    try:
        parts = urllib.parse.urlsplit(target)
    except ValueError as exc:
        raise h11.RemoteProtocolError(f"request target: {exc}", 400) from None
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.unquote(parts.path), query


class LogHub(logging.Handler):
    """Hands log records to the `/logs` streams, each with a bounded queue.

    Records are formatted once and offered to every subscriber at or above
    their level; a subscriber whose queue is full loses the line (counted
    in `dropped`). Only records from the trio thread are offered: a
    memory channel is not for other threads.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.subscribers: set[tuple[int, trio.MemorySendChannel[dict[str, str]]]] = set()
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if not self.subscribers:
            return
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return
        kind = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}.get(
            record.levelno, "error"
        )
        try:
            payload = record.getMessage()
        except Exception:  # a bad format string in someone's log call
            payload = str(record.msg)
        entry = {"type": kind, "payload": payload, "time": clashapi.rfc3339(record.created)}
        for level, channel in list(self.subscribers):
            if record.levelno >= level:
                try:
                    channel.send_nowait(entry)
                except trio.WouldBlock:
                    self.dropped += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.subscribers.discard((level, channel))


class Access:
    """Who may ask: the secret, the Host check and CORS.

    Args:
        secret: the Bearer token required (None: none, loopback Hosts only).
    """

    def __init__(self, secret: str | None) -> None:
        self.secret = secret

    def authorized(self, request: Request) -> bool:
        if not self.secret:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.secret.encode()):
            return True
        if request.websocket and "token" in request.query:
            return hmac.compare_digest(request.query["token"].encode(), self.secret.encode())
        return False

    @staticmethod
    def loopback_origin(request: Request) -> bool:
        """Whether the request comes from no web page, or from one on loopback."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        try:
            host = urllib.parse.urlsplit(origin).netloc
        except ValueError:  # unbalanced [ ]: no page of ours sends that
            return False
        return bool(host) and is_loopback_host(host)

    def cors_headers(self, request: Request) -> list[tuple[str, str]]:
        origin = request.headers.get("origin")
        if origin is None:
            return []
        if self.secret:
            allowed = "*"
        else:
            if not self.loopback_origin(request):
                return []
            allowed = origin
        headers = [
            ("Access-Control-Allow-Origin", allowed),
            ("Access-Control-Allow-Methods", ALLOW_METHODS),
            ("Access-Control-Allow-Headers", ALLOW_HEADERS),
            ("Access-Control-Max-Age", "600"),
            ("Vary", "Origin"),
        ]
        if self.secret and "access-control-request-private-network" in request.headers:
            headers.append(("Access-Control-Allow-Private-Network", "true"))
        return headers

    def refusal(self, request: Request) -> Reply | None:
        """The answer to a request we do not serve, before any routing."""
        if request.method == "OPTIONS":
            return Reply(204)
        if not self.secret and not is_loopback_host(request.headers.get("host", "localhost")):
            return message(403, "loopback hosts only (set a secret to allow others)")
        if not self.secret and request.websocket and not self.loopback_origin(request):
            # CORS does not cover WebSockets: without this, any web page
            # could read the connections stream. Browsers always send Origin.
            return message(
                403, "WebSockets from loopback pages only (set a secret to allow others)"
            )
        if request.path in ("/ui", "/ui/"):
            return None
        if not self.authorized(request):
            return message(401, "Unauthorized")
        return None


class Controller:
    """Answers the API for one engine.

    Args:
        engine: the running engine.
        secret: the Bearer token required (None: none, loopback Hosts only).
        reload: what `PUT /configs` calls with the body's path (or None):
            None on success, else the one-line error.
        log_level: Clash's name of the level the program runs at.
    """

    def __init__(
        self,
        engine: Controlled,
        *,
        secret: str | None = None,
        reload: Reload | None = None,
        log_level: str = "info",
    ) -> None:
        self.engine = engine
        self.state = ApiState(engine, log_level)
        self.access = Access(secret)
        self.reload = reload
        self.hub = LogHub()

    # -- routing --------------------------------------------------------------------

    async def answer(self, request: Request) -> Reply | Producer:
        """The reply, or the producer of a stream, for an allowed request."""
        refused = self.access.refusal(request)
        if refused is not None:
            return refused
        try:
            return await self._route(request)
        except ApiError as exc:
            return message(exc.status, str(exc))

    async def _route(self, request: Request) -> Reply | Producer:
        method, path, state = request.method, request.path.rstrip("/") or "/", self.state
        if method == "HEAD":
            method = "GET"
        parts = path.split("/")[1:]
        head = parts[0]
        if method == "GET":
            if path == "/":
                return json_reply(200, {"hello": "tun2sx"})
            if path == "/version":
                return json_reply(200, {"version": clashapi.VERSION, "meta": True})
            if path == "/configs":
                return json_reply(200, state.configs())
            if path == "/proxies":
                return json_reply(200, state.proxies())
            if head == "proxies" and len(parts) == 2:
                return json_reply(200, state.proxy(parts[1]))
            if head == "proxies" and len(parts) == 3 and parts[2] == "delay":
                return await self._delay(parts[1], request.query)
            if path == "/group":
                return json_reply(200, {"proxies": self._groups()})
            if head == "group" and len(parts) == 2:
                clashapi.group_delays(self.engine.router.outbounds, parts[1])
                return json_reply(200, state.proxy(parts[1]))
            if head == "group" and len(parts) == 3 and parts[2] == "delay":
                return await self._group_delay(parts[1], request.query)
            if path in ("/providers/proxies", "/providers/rules"):
                return json_reply(200, {"providers": {}})
            if path == "/rules":
                return json_reply(200, state.rules())
            if path == "/connections":
                # A snapshot, as mihomo answers a plain GET; a stream over
                # a WebSocket, or over chunked HTTP when asked for with an
                # interval.
                if request.websocket or "interval" in request.query:
                    return self._connections_stream(request.query)
                return json_reply(200, state.connections())
            if path == "/traffic":
                return self._traffic
            if path == "/memory":
                return self._memory
            if path == "/logs":
                return self._logs(request.query)
            if path == "/stats":
                return json_reply(200, self.engine.statistics())
            if path == "/metrics":
                return Reply(200, self.metrics().encode(), metrics.CONTENT_TYPE)
            if path == "/ui":
                return Reply(200, _ui_page(), "text/html; charset=utf-8")
            raise ApiError(404, "not found")
        if method == "PATCH" and path == "/configs":
            state.patch_configs(_json_body(request))
            return Reply(204)
        if method == "PUT" and path == "/configs":
            return await self._reload(request)
        if method == "PUT" and head == "proxies" and len(parts) == 2:
            state.select(parts[1], _json_body(request))
            return Reply(204)
        if method == "DELETE" and path == "/connections":
            state.close_all()
            return Reply(204)
        if method == "DELETE" and head == "connections" and len(parts) == 2:
            state.close_connection(parts[1])
            return Reply(204)
        raise ApiError(405 if method not in ("GET", "HEAD") else 404, f"{method} {path}: no such")

    def metrics(self) -> str:
        engine = self.engine
        dns = engine.dns
        store = engine.fakeip
        answers = None
        if dns is not None:
            numbers = attrs.asdict(dns.statistics())
            answers = {k.removesuffix("_answers"): v for k, v in numbers.items() if "answers" in k}
            answers["forwarded"] = numbers.get("forwarded", 0)
        mappings = None
        if store is not None:
            sizes = store.statistics()
            mappings = {"4": sizes.v4_mappings, "6": sizes.v6_mappings}
        return metrics.render(
            engine.statistics(),
            engine.connect_times,
            dns_answers=answers,
            fake_ip_mappings=mappings,
        )

    def _groups(self) -> list[dict[str, Any]]:
        outbounds = self.engine.router.outbounds
        return [
            self.state.proxy(name)
            for name, outbound in outbounds.items()
            if isinstance(outbound, clashapi.Group)
        ]

    async def _reload(self, request: Request) -> Reply:
        if self.reload is None:
            raise ApiError(501, "reloading is not available in this run")
        body = _json_body(request) if request.body.strip() else {}
        path = body.get("path") if isinstance(body, dict) else None
        if path is not None and not isinstance(path, str):
            raise ApiError(400, "path must be a string")
        result = self.reload(path or None)
        if not isinstance(result, str) and result is not None:
            result = await result
        if result is not None:
            raise ApiError(400, result)
        return Reply(204)

    async def _delay(self, name: str, query: dict[str, str]) -> Reply:
        url, timeout = _delay_args(query)
        if name == clashapi.GLOBAL:
            name = self.state.global_choice
        if name not in self.engine.router.outbounds and name != REJECT:
            raise ApiError(404, f"no proxy named {name!r}")
        delay = await _measure(self.state.outbound(name), url, timeout)
        if delay is None:
            return message(504, "Timeout")
        if delay <= 0:
            return message(503, "An error occurred in the delay test")
        return json_reply(200, {"delay": delay})

    async def _group_delay(self, name: str, query: dict[str, str]) -> Reply:
        group = clashapi.group_delays(self.engine.router.outbounds, name)
        url, timeout = _delay_args(query)
        results: dict[str, int] = {}

        async def one(member: str) -> None:
            delay = await _measure(self.state.outbound(member), url, timeout)
            if delay:
                results[member] = delay

        async with trio.open_nursery() as nursery:
            for member in group.members:
                nursery.start_soon(one, member)
        return json_reply(200, results)

    # -- streams --------------------------------------------------------------------

    async def _traffic(self) -> AsyncGenerator[object, None]:
        stats = self.engine.statistics()
        up, down = stats.get("bytes_up", 0), stats.get("bytes_down", 0)
        yield {"up": 0, "down": 0}
        while True:
            await trio.sleep(1)
            stats = self.engine.statistics()
            now_up, now_down = stats.get("bytes_up", 0), stats.get("bytes_down", 0)
            yield {"up": max(0, now_up - up), "down": max(0, now_down - down)}
            up, down = now_up, now_down

    async def _memory(self) -> AsyncGenerator[object, None]:
        while True:
            yield {"inuse": metrics.rss_bytes(), "oslimit": 0}
            await trio.sleep(1)

    def _connections_stream(self, query: dict[str, str]) -> Producer:
        interval = _interval(query)

        async def produce() -> AsyncGenerator[object, None]:
            while True:
                yield self.state.connections()
                await trio.sleep(interval)

        return produce

    def _logs(self, query: dict[str, str]) -> Producer:
        name = query.get("level", "info").lower()
        if name not in clashapi.LOG_LEVELS:
            raise ApiError(400, f"level: expected one of {', '.join(clashapi.LOG_LEVELS)}")
        level = clashapi.LOG_LEVELS[name]
        # mihomo's other shape, which newer dashboards ask for.
        structured = query.get("format") == "structured"

        async def produce() -> AsyncGenerator[object, None]:
            send, receive = trio.open_memory_channel[dict[str, str]](LOG_QUEUE)
            entry = (level, send)
            self.hub.subscribers.add(entry)
            try:
                async with receive:
                    async for item in receive:
                        if structured:
                            yield {
                                "time": item["time"],
                                "level": item["type"],
                                "message": item["payload"],
                                "fields": [],
                            }
                        else:
                            yield {"type": item["type"], "payload": item["payload"]}
            finally:
                self.hub.subscribers.discard(entry)
                send.close()

        return produce


def _json_body(request: Request) -> Any:
    try:
        return json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body is not JSON") from None
    except RecursionError:  # "[[[[...": nested deeper than the interpreter recurses
        raise ApiError(400, "body is nested too deeply") from None


def _interval(query: dict[str, str]) -> float:
    try:
        value = float(query.get("interval", "1000")) / 1000
    except ValueError:
        value = math.nan
    # `not a <= x <= b` refuses NaN too.
    if not 0 <= value <= MAX_INTERVAL:
        raise ApiError(
            400,
            f"interval: 0 to {MAX_INTERVAL * 1000:.0f} ms "
            f"(below {MIN_INTERVAL * 1000:.0f} counts as {MIN_INTERVAL * 1000:.0f})",
        )
    return max(MIN_INTERVAL, value)


def _delay_args(query: dict[str, str]) -> tuple[str, float]:
    url = query.get("url") or "http://www.gstatic.com/generate_204"
    try:
        timeout = int(query.get("timeout", "5000")) / 1000
    except ValueError:
        timeout = math.nan  # "1e-300", "nan", "5s": the same one line
    if not 0 < timeout <= 60:
        raise ApiError(400, "timeout: 1 to 60000 ms")
    # Imported here: with no delay test asked for, the groups' module
    # (and ssl, for https checks) stays unloaded.
    from outbounds.group import parse_check_url

    try:
        parse_check_url(url)
    except ValueError as exc:
        raise ApiError(400, f"url: {exc}") from None
    return url, timeout


async def _measure(outbound: Outbound | None, url: str, timeout: float) -> int | None:
    """Milliseconds for `url` through `outbound`; None on time-out, 0 on failure.

    The groups' own measurement: an http(s) GET timed to the status line,
    or a connect for a tcp:// target.
    """
    if outbound is None:
        return 0
    from outbounds.group import measure_delay

    try:
        with trio.fail_after(timeout):
            return await measure_delay(outbound, url, timeout)
    except (TimeoutError, trio.TooSlowError):
        return None
    except (OutboundError, OSError, trio.BrokenResourceError, ValueError):
        return 0


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _ui_page() -> bytes:
    from importlib import resources

    return resources.files("tun2sx.control").joinpath("ui.html").read_bytes()


# -- the connection loop ---------------------------------------------------------------


Answer = Callable[[Request], Awaitable["Reply | Producer"]]
# The CORS headers a request's answer gets (`Access.cors_headers`).
Cors = Callable[["Request"], list[tuple[str, str]]]


class _Client:
    """One accepted connection: h11 for HTTP, then wsproto once upgraded."""

    def __init__(self, stream: trio.abc.Stream, answer: Answer, cors: Cors) -> None:
        self.stream = stream
        self.answer = answer
        self.cors = cors
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        # A WebSocket's reader answers pings and the close handshake while
        # its writer may be in the middle of a message: one sender at a time.
        self.send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            async with self.send_lock:
                await self.stream.send_all(data)

    async def send_event(self, event: Any) -> None:
        data = self.http.send(event)
        if data:
            await self.send(data)

    async def run(self) -> None:
        while True:
            request = await self.read_request()
            if request is None:
                return
            result = await self.answer(request)
            cors = self.cors(request)
            if isinstance(result, Reply):
                await self.reply(result, cors, request.method == "HEAD")
                if self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
                    return
                self.http.start_next_cycle()
                continue
            if request.method == "HEAD":
                await self.reply(Reply(200), cors, True)
            elif request.websocket:
                await self.websocket(request, result)
            else:
                await self.chunked(result, cors)
            return

    async def read_request(self) -> Request | None:
        http = self.http
        with trio.move_on_after(REQUEST_TIMEOUT):
            head: h11.Request | None = None
            body = bytearray()
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(16384)
                    http.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        await self.reply(message(413, "body too large"), [], False)
                        return None
                elif isinstance(event, h11.EndOfMessage | h11.PAUSED) and head is not None:
                    break
                else:  # ConnectionClosed
                    return None
            path, query = parse_target(head.target.decode("ascii", "replace"))
            headers = {k.decode("ascii").lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(head.method.decode("ascii"), path, query, headers, bytes(body))
        return None

    async def reply(self, reply: Reply, extra: list[tuple[str, str]], head_only: bool) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *extra,
        ]
        if self.http.their_state is not h11.DONE:
            headers.append(("Connection", "close"))
        if reply.status == 204:
            headers = [h for h in headers if h[0] not in ("Content-Type", "Content-Length")]
        await self.send_event(
            h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        )
        if reply.body and not head_only and reply.status != 204:
            await self.send_event(h11.Data(data=reply.body))
        await self.send_event(h11.EndOfMessage())

    async def chunked(self, produce: Producer, cors: list[tuple[str, str]]) -> None:
        headers = [
            ("Content-Type", "application/json"),
            ("Cache-Control", "no-store"),
            ("Transfer-Encoding", "chunked"),
            *cors,
        ]
        await self.send_event(h11.Response(status_code=200, headers=headers, reason=b"OK"))

        async def write(item: object) -> None:
            await self.send_event(h11.Data(data=json.dumps(item).encode() + b"\n"))

        async def watch() -> None:
            # A stream's client sends nothing more: its EOF means it left,
            # which a stream that has nothing to send would never notice.
            while await self.stream.receive_some(4096):
                pass

        await self._pump(produce, write, watch)

    async def _pump(
        self,
        produce: Producer,
        write: Callable[[object], Awaitable[None]],
        watch: Callable[[], Awaitable[None]],
    ) -> None:
        """Write what `produce` yields until it ends, a write fails or
        stalls, or `watch` (reading the client) returns."""
        async with trio.open_nursery() as nursery:

            async def watcher() -> None:
                with contextlib.suppress(*_GONE):
                    await watch()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watcher)
            with contextlib.suppress(*_GONE):
                async with contextlib.aclosing(produce()) as items:
                    async for item in items:
                        await write(item)
            nursery.cancel_scope.cancel()

    async def websocket(self, request: Request, produce: Producer) -> None:
        key = request.headers.get("sec-websocket-key", "")
        accept = wsproto.utilities.generate_accept_token(key.encode("latin-1"))
        await self.send_event(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", accept.decode()),
                ],
            )
        )
        ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
        ws.receive_data(bytes(self.http.trailing_data[0]))
        open_state = wsproto.connection.ConnectionState.OPEN

        async def write(item: object) -> None:
            if ws.state is open_state:
                await self.send(ws.send(wsproto.events.TextMessage(data=json.dumps(item))))

        async def watch() -> None:
            await self._ws_reader(ws)

        await self._pump(produce, write, watch)
        if ws.state is open_state:
            with contextlib.suppress(*_GONE):
                await self.send(ws.send(wsproto.events.CloseConnection(code=1000)))

    async def _ws_reader(self, ws: wsproto.connection.Connection) -> None:
        """Answer pings and the close handshake; return once closed."""
        try:
            while True:
                for event in ws.events():
                    if isinstance(event, wsproto.events.CloseConnection):
                        if ws.state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                            await self.send(ws.send(event.response()))
                        return
                    if isinstance(event, wsproto.events.Ping):
                        await self.send(ws.send(event.response()))
                data = await self.stream.receive_some(16384)
                if not data:
                    return
                ws.receive_data(bytes(data))
        except wsproto.utilities.RemoteProtocolError as exc:
            log.debug("controller: bad WebSocket data: %s", exc)


# What ends a client's connection without being anybody's bug: it went
# away, or stopped reading for SEND_TIMEOUT.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


async def _send_error(stream: trio.abc.Stream, status: int, text: str) -> None:
    """An error response written by hand: h11's state may not allow one."""
    body = json.dumps({"message": text}).encode()
    raw = (
        f"HTTP/1.1 {status} {_reason(status).decode()}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with trio.move_on_after(SEND_TIMEOUT), contextlib.suppress(*_GONE):
        await stream.send_all(raw)


async def handle_client(stream: trio.abc.Stream, answer: Answer, cors: Cors) -> None:
    """Serve one connection until it closes, fails or stalls; never raises
    for what a client sends or how it goes away."""
    client = _Client(stream, answer, cors)
    try:
        await client.run()
    except h11.RemoteProtocolError as exc:
        log.debug("controller: bad request: %s", exc)
        await _send_error(stream, exc.error_status_hint, f"bad request: {exc}")
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    except h11.LocalProtocolError as exc:
        log.debug("controller: cannot answer: %s", exc)
    except Exception:
        # A bug answering one request must not take the engine down with
        # the controller: logged loudly, that connection closed.
        log.exception("controller: request failed")
        if client.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send_error(stream, 500, "internal error (logged)")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_listeners(
    answer: Answer,
    cors: Cors,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on `listeners` until cancelled (at most MAX_CONNECTIONS at once)."""
    slots = trio.Semaphore(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await handle_client(stream, answer, cors)
        finally:
            slots.release()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def serve_controller(
    controller: Controller,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `controller` on `listeners` until cancelled; logs go to /logs."""
    root = logging.getLogger("tun2sx")
    root.addHandler(controller.hub)
    try:
        await serve_listeners(
            controller.answer, controller.access.cors_headers, listeners, task_status=task_status
        )
    finally:
        root.removeHandler(controller.hub)
