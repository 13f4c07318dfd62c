"""Statistics for the operator: a periodic summary log line and a local endpoint.

The summary line (every `stats_interval` seconds) answers "is it working,
how busy is it, is it dropping" from the log alone. The endpoint is a tiny
read-only HTTP/1.1 server for the details:

    GET /stats         the engine's counters, as one JSON object
    GET /connections   the live flows: application endpoint, host name,
                       outbound, bytes each way, age

It is off by default and only ever listens on loopback, because the
connection list names every host the machine talks to. A web page could
still reach a loopback port through DNS rebinding, so a request whose
`Host` header names anything but a loopback address is refused too.
Nothing here changes state: there are no writes to offer.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import trio

from tun2sx.dataplane.context import FlowInfo

log = logging.getLogger("tun2sx.stats")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
_LOOPBACK_NAMES = ("localhost",)


class StatsSource(Protocol):
    """What the stats need from the engine (a fake in tests)."""

    @property
    def flows(self) -> Collection[FlowInfo]: ...

    def statistics(self) -> dict[str, int]: ...


class BadRequest(Exception):
    """The request head is not one we answer; the message goes in the 400."""


def parse_loopback_endpoint(value: str) -> tuple[str, int]:
    """`host:port` where host is a loopback address (or `localhost`).

    Same as `parse_endpoint(value, any_address=False)`.
    """
    return parse_endpoint(value, any_address=False)


def parse_endpoint(value: str, *, any_address: bool) -> tuple[str, int]:
    """`host:port` where host is an address literal (or `localhost`).

    Args:
        value: e.g. ``127.0.0.1:9090`` or ``[::1]:9090``.
        any_address: allow addresses other than loopback (the controller
            does when a secret is set).

    Returns:
        (host, port), host as an address literal without brackets.

    Raises:
        ValueError: not HOST:PORT, a bad port, or not loopback.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in {value!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0..65535")
    if host.lower() in _LOOPBACK_NAMES:
        return "127.0.0.1", port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address or localhost") from None
    if not address.is_loopback and not any_address:
        raise ValueError(
            f"{host} is not a loopback address; without a secret the stats listen on loopback only"
        )
    return str(address), port


def _is_loopback_host(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:  # name:port; a bare v6 address has more colons
        host = host.partition(":")[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the summary line ---------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def summary_line(stats: dict[str, int], previous: dict[str, int]) -> str:
    """One log line from two snapshots of `Engine.statistics()`.

    Args:
        stats: the counters now.
        previous: the counters at the last line ({} for the first).

    Returns:
        e.g. ``tcp 3 open (+12), udp 1 open (+2), up 1.0 KiB (+10 B),
        down 4.0 MiB (+2.0 MiB), drops 3 (+2: udp_receive_drops +2)``.
    """

    def delta(key: str) -> int:
        return stats.get(key, 0) - previous.get(key, 0)

    # Each place that drops has its counter; "drops" is their total.
    drops = sum(v for k, v in stats.items() if "drop" in k and k != "drops")
    drops_before = sum(v for k, v in previous.items() if "drop" in k and k != "drops")
    # Which counters moved, so the line says where packets were lost.
    moved = ", ".join(
        f"{k} +{delta(k)}" for k in sorted(stats) if "drop" in k and k != "drops" and delta(k) > 0
    )
    return (
        f"tcp {stats.get('tcp_flows', 0)} open (+{delta('tcp_flows_started')}), "
        f"udp {stats.get('udp_sessions', 0)} open (+{delta('udp_sessions_started')}), "
        f"up {_size(stats.get('bytes_up', 0))} (+{_size(delta('bytes_up'))}), "
        f"down {_size(stats.get('bytes_down', 0))} (+{_size(delta('bytes_down'))}), "
        f"drops {drops} (+{drops - drops_before}{': ' + moved if moved else ''})"
    )


async def log_summaries(source: StatsSource, interval: float) -> None:
    """Log `summary_line` every `interval` seconds, until cancelled.

    Args:
        source: the engine.
        interval: seconds between lines; must be positive.
    """
    previous: dict[str, int] = {}
    while True:
        await trio.sleep(interval)
        stats = source.statistics()
        log.info("stats: %s", summary_line(stats, previous))
        previous = stats


# -- the endpoint ---------------------------------------------------------------


def connections_json(source: StatsSource, now: float) -> list[dict[str, Any]]:
    """The live flows, oldest first, as JSON-ready dicts."""
    return [
        {
            "network": info.network,
            "app": info.app,
            "host": str(info.destination.host),
            "port": info.destination.port,
            "outbound": info.outbound,
            "bytes_up": info.bytes_up,
            "bytes_down": info.bytes_down,
            "age": round(now - info.started, 3),
        }
        for info in sorted(source.flows, key=lambda info: info.started)
    ]


def parse_request_head_untrusted(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, path (without query) and headers (lower-case names).

    Raises:
        BadRequest: anything that is not a plain HTTP/1.x request head.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        headers[name.lower()] = value.strip()
    return method, target.partition("?")[0], headers


def _response(status: str, body: bytes, *, head_only: bool, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"{extra}\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def _error(message: str) -> bytes:
    # json here and below, not at the top: most runs serve no stats endpoint.
    import json

    return json.dumps({"error": message}).encode() + b"\n"


def _checked(head: bytes) -> tuple[str, bool] | bytes:
    """The path and HEAD-ness of a request we answer, or the error response."""
    try:
        method, path, headers = parse_request_head_untrusted(head)
    except BadRequest as exc:
        return _response("400 Bad Request", _error(str(exc)), head_only=False)
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _response(
            "405 Method Not Allowed",
            _error("read-only"),
            head_only=False,
            extra="Allow: GET, HEAD\r\n",
        )
    if "host" in headers and not _is_loopback_host(headers["host"]):
        return _response("403 Forbidden", _error("loopback hosts only"), head_only=head_only)
    if path not in ("/stats", "/connections"):
        return _response("404 Not Found", _error("try /stats or /connections"), head_only=head_only)
    return path, head_only


def _ok(body: object, head_only: bool) -> bytes:
    import json

    data = json.dumps(body, sort_keys=True).encode() + b"\n"
    return _response("200 OK", data, head_only=head_only)


def respond(source: StatsSource, head: bytes, now: float) -> bytes:
    """The whole response to one request head (pure: testable without sockets)."""
    checked = _checked(head)
    if isinstance(checked, bytes):
        return checked
    path, head_only = checked
    if path == "/stats":
        return _ok(source.statistics(), head_only)
    return _ok(connections_json(source, now), head_only)


async def read_request_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head without its blank line; None when it ends early or
    grows past MAX_REQUEST_HEAD (reading at most 4 KiB more than that)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_REQUEST_HEAD:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    return bytes(buf[: buf.index(b"\r\n\r\n")])


async def _handle(answer: Callable[[bytes], Awaitable[bytes]], stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = await read_request_head(stream)
            if head is None:
                await stream.send_all(
                    _response("400 Bad Request", _error("incomplete request"), head_only=False)
                )
                return
            await stream.send_all(await answer(head))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def open_stats_listeners(
    host: str, port: int, *, any_address: bool = False
) -> list[trio.SocketListener]:
    """Listen for the endpoint on a loopback address (any with `any_address`).

    Args:
        host: a loopback address (checked again here, for embedders).
        port: the TCP port (0: any free one; ask the listener which).
        any_address: allow a non-loopback `host` (a secret is set).

    Raises:
        ValueError: `host` is not loopback.
        OSError: the port cannot be bound.
    """
    host, port = parse_endpoint(f"[{host}]:{port}", any_address=any_address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    for listener in listeners:
        log.info("stats endpoint on http://%s/stats", _sockname(listener))
    return listeners


async def serve_stats(
    source: StatsSource,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on `listeners` until cancelled, then close them.

    Args:
        source: the engine.
        listeners: from `open_stats_listeners`; owned from now on.
        task_status: told once accepting.
    """

    async def answer(head: bytes) -> bytes:
        return respond(source, head, trio.current_time())

    await _serve(answer, listeners, task_status)


async def _serve(
    answer: Callable[[bytes], Awaitable[bytes]],
    listeners: list[trio.SocketListener],
    task_status: trio.TaskStatus[None],
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _handle(answer, stream)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


# -- the totals of several workers ------------------------------------------------

WORKER_TIMEOUT = 5.0
MAX_WORKER_RESPONSE = 64 * 1024 * 1024


def merge_statistics(parts: list[dict[str, int]]) -> dict[str, int]:
    """The workers' counters added up (every counter and gauge is a count)."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def merge_connections(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The workers' flows in one list, oldest first, each with its worker."""
    rows = [dict(row, worker=index) for index, part in enumerate(parts) for row in part]
    rows.sort(key=lambda row: -row["age"])
    return rows


async def fetch_json(host: str, port: int, path: str) -> Any:
    """GET `path` from a worker's endpoint on loopback; the JSON body.

    Raises:
        OSError: no connection.
        ValueError: not a 200 response with a JSON body (or far too large).
    """
    stream = await trio.open_tcp_stream(host, port)
    try:
        literal = f"[{host}]" if ":" in host else host
        request = f"GET {path} HTTP/1.1\r\nHost: {literal}\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode("ascii"))
        buf = bytearray()
        while data := await stream.receive_some(65536):
            buf += data
            if len(buf) > MAX_WORKER_RESPONSE:
                raise ValueError("response too large")
    finally:
        await trio.aclose_forcefully(stream)
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200 "):
        status = head.partition(b"\r\n")[0].decode("ascii", "replace")
        raise ValueError(f"answered {status!r}")
    import json

    return json.loads(body)


async def totals_response(head: bytes, workers: list[tuple[str, int]]) -> bytes:
    """Answer one request with the sum over the workers' endpoints."""
    checked = _checked(head)
    if isinstance(checked, bytes):
        return checked
    path, head_only = checked
    parts = []
    for index, (host, port) in enumerate(workers):
        try:
            with trio.fail_after(WORKER_TIMEOUT):
                parts.append(await fetch_json(host, port, path))
        except (OSError, ValueError, trio.TooSlowError) as exc:
            # TooSlowError carries no text, and some OSErrors none either.
            reason = (
                f"no answer within {WORKER_TIMEOUT:g} s"
                if isinstance(exc, trio.TooSlowError)
                else str(exc) or type(exc).__name__
            )
            message = f"worker {index} (port {port}) did not answer: {reason}"
            return _response("503 Service Unavailable", _error(message), head_only=head_only)
    if path == "/stats":
        return _ok(merge_statistics(parts), head_only)
    return _ok(merge_connections(parts), head_only)


async def serve_totals(
    sockets: list[socket.socket],
    workers: list[tuple[str, int]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the workers' totals on already bound, listening `sockets`.

    Args:
        sockets: listening sockets (owned from now on).
        workers: each worker's own endpoint, (host, port), by index.
        task_status: told once accepting.
    """
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]

    async def answer(head: bytes) -> bytes:
        return await totals_response(head, workers)

    await _serve(answer, listeners, task_status)


def _sockname(listener: trio.SocketListener) -> str:
    addr = listener.socket.getsockname()
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
