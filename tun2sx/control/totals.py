"""The controller of several workers: their totals, read-only.

With `workers > 1` each worker process runs its own engine and its own
controller on a loopback port after the configured one (worker i on
port + 1 + i). The parent answers on the configured address with what
can be added up: `/stats` (counters summed), `/connections` (every
worker's flows in one list, each with its `worker`, the totals summed),
`/metrics` (every sample labelled with its worker) and `/version`. What
changes state or streams (mode, group selection, closing a flow, the
streams, delay tests) is per worker, and the parent refuses it with 501
and a message naming the worker ports: forwarding a selection to every
worker would half-apply when one fails, and closing a flow needs the
worker that has it, which the worker's own port already serves.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import trio

from tun2sx.control import clashapi, metrics
from tun2sx.control.controller import (
    Access,
    Producer,
    Reply,
    Request,
    json_reply,
    message,
    serve_listeners,
)

log = logging.getLogger("tun2sx.controller")

WORKER_TIMEOUT = 5.0
MAX_WORKER_RESPONSE = 64 * 1024 * 1024


class WorkerError(Exception):
    """A worker's endpoint did not give a usable answer."""


def merge_statistics(parts: list[dict[str, int]]) -> dict[str, int]:
    """The workers' counters added up (every counter and gauge is a count)."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def merge_connections(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' GET /connections as one, oldest flow first."""
    rows = [
        dict(row, worker=index)
        for index, part in enumerate(parts)
        for row in part.get("connections", [])
    ]
    rows.sort(key=lambda row: row.get("start", ""))
    return {
        "downloadTotal": sum(part.get("downloadTotal", 0) for part in parts),
        "uploadTotal": sum(part.get("uploadTotal", 0) for part in parts),
        "connections": rows,
        "memory": 0,
    }


async def fetch(host: str, port: int, path: str, secret: str | None) -> bytes:
    """GET `path` from a worker's endpoint; the body of a 200 answer.

    Raises:
        OSError: no connection.
        WorkerError: not a 200 answer, far too large, or the connection
            broke (the worker stopped mid-answer).
    """
    stream = await trio.open_tcp_stream(host, port)
    try:
        literal = f"[{host}]" if ":" in host else host
        auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
        request = f"GET {path} HTTP/1.1\r\nHost: {literal}\r\n{auth}Connection: close\r\n\r\n"
        await stream.send_all(request.encode("ascii"))
        buf = bytearray()
        while data := await stream.receive_some(65536):
            buf += data
            if len(buf) > MAX_WORKER_RESPONSE:
                raise WorkerError("response too large")
    except trio.BrokenResourceError as exc:
        raise WorkerError(str(exc.__cause__ or exc)) from None
    finally:
        await trio.aclose_forcefully(stream)
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200 "):
        status = head.partition(b"\r\n")[0].decode("ascii", "replace")
        raise WorkerError(f"answered {status!r}")
    return body


class Totals:
    """Answers the parent's endpoint from the workers' ones.

    Args:
        workers: each worker's endpoint, (host, port), by index.
        secret: the Bearer token (the workers' too).
    """

    def __init__(self, workers: list[tuple[str, int]], secret: str | None = None) -> None:
        self.workers = workers
        self.access = Access(secret)
        self.secret = secret

    async def answer(self, request: Request) -> Reply | Producer:
        refused = self.access.refusal(request)
        if refused is not None:
            return refused
        path = request.path.rstrip("/") or "/"
        if request.method != "GET" or request.websocket or path not in _READS:
            ports = ", ".join(str(port) for _, port in self.workers)
            return message(
                501,
                f"with {len(self.workers)} workers this address serves the totals only "
                f"(/stats, /connections, /metrics, /version); {request.method} {path} goes "
                f"to one worker's own port ({ports})",
            )
        if path == "/":
            return json_reply(200, {"hello": "tun2sx"})
        if path == "/version":
            return json_reply(200, {"version": clashapi.VERSION, "meta": True})
        parts = []
        for index, (host, port) in enumerate(self.workers):
            try:
                with trio.fail_after(WORKER_TIMEOUT):
                    parts.append(await fetch(host, port, path, self.secret))
            except (OSError, WorkerError, trio.TooSlowError) as exc:
                # TooSlowError carries no text, and some OSErrors none either.
                reason = (
                    f"no answer within {WORKER_TIMEOUT:g} s"
                    if isinstance(exc, trio.TooSlowError)
                    else str(exc) or type(exc).__name__
                )
                return message(503, f"worker {index} (port {port}) did not answer: {reason}")
        if path == "/metrics":
            text = metrics.merge_workers([part.decode() for part in parts])
            return Reply(200, text.encode(), metrics.CONTENT_TYPE)
        try:
            bodies = [json.loads(part) for part in parts]
        except ValueError:
            return message(503, "a worker answered with something that is not JSON")
        if path == "/stats":
            return json_reply(200, merge_statistics(bodies))
        return json_reply(200, merge_connections(bodies))


_READS = ("/", "/version", "/stats", "/connections", "/metrics")


async def serve_totals(
    sockets: list[socket.socket],
    workers: list[tuple[str, int]],
    secret: str | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the workers' totals on already bound, listening `sockets`.

    Args:
        sockets: listening sockets (owned from now on).
        workers: each worker's own endpoint, (host, port), by index.
        secret: the Bearer token required here and sent to the workers.
        task_status: told once accepting.
    """
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    totals = Totals(workers, secret)
    await serve_listeners(
        totals.answer, totals.access.cors_headers, listeners, task_status=task_status
    )
