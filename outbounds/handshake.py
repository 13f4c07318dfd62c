"""The read-and-answer loop of a proxy handshake, shared by the proxy outbounds.

A proxy handshake is a sans-I/O client fed the proxy's bytes until it has
its answer. The loop that feeds it, bounds the time and the number of
reads, and turns a dropped or garbled connection into an `OutboundError`
is the same for SOCKS5, SOCKS4 and HTTP CONNECT, so it lives here once.
So do the parts the one-request protocols (SOCKS4, HTTP CONNECT) share:
`OneRequestClient`, the buffering half of their clients, and
`open_tunnel`, which sends the request with the connect (in the SYN, with
TCP Fast Open) and waits for the answer.
"""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

import trio

from .base import Destination, FailureReply, NowaitStream, OutboundError
from .net import SocketOptions, TcpSocketStream, open_tcp

__all__ = [
    "NEED_DATA",
    "HandshakeClient",
    "OneRequestClient",
    "ProxyClosed",
    "open_tunnel",
    "run_handshake",
]


class ProxyClosed(OutboundError):
    """The proxy closed or reset the connection before its final answer.

    On a connection made ahead of its use, that can be the proxy's own idle
    timeout rather than a refusal: the SOCKS5 outbound asks again once on a
    new connection (outbounds.socks5, `preconnect`).
    """


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""A handshake client needs more bytes from the proxy."""

NeedData = _NeedData
EventT = TypeVar("EventT")
EventT_co = TypeVar("EventT_co", covariant=True)


class HandshakeClient(Protocol[EventT_co]):
    """What `run_handshake` drives: a sans-I/O client of one exchange."""

    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes | bytearray) -> None: ...

    def next_event_untrusted(self) -> _NeedData | EventT_co: ...


class OneRequestClient(Generic[EventT]):
    """A client that sends one request and reads one answer, without I/O.

    Usage: send `data_to_send()` (the request, once), feed the proxy's
    bytes with `receive_data`, call `next_event_untrusted()` until it
    returns the answer; then `trailing_data` holds what followed it, the
    stream's first bytes. Subclasses parse the answer.
    """

    __slots__ = ("_buffer", "_done", "_outgoing")

    def __init__(self, request: bytes) -> None:
        self._outgoing = request
        self._buffer = bytearray()
        self._done = False

    def data_to_send(self) -> bytes:
        """The request, once; then b""."""
        out, self._outgoing = self._outgoing, b""
        return out

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes read from the proxy."""
        self._buffer += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes after the answer: they belong to the stream."""
        return bytes(self._buffer) if self._done else b""

    def next_event_untrusted(self) -> _NeedData | EventT:
        """The answer once it is whole, else NEED_DATA.

        Raises:
            The subclass's protocol error: bytes it cannot take, or a call
            after the answer.
        """
        if self._done:
            raise self._protocol_error("the answer was already read")
        event = self._answer_untrusted(self._buffer)
        if event is not NEED_DATA:
            self._done = True
        return event

    @abstractmethod
    def _answer_untrusted(self, buf: bytearray) -> _NeedData | EventT:
        """Parse (and remove from `buf`) the answer, or NEED_DATA."""

    @abstractmethod
    def _protocol_error(self, message: str) -> Exception:
        """The protocol's error for `message`."""


async def run_handshake(
    stream: NowaitStream,
    client: HandshakeClient[EventT],
    *,
    proxy: str,
    what: object,
    started: float,
    timeout: float,
    protocol_error: type[Exception],
    max_reads: int,
    before_wait: Callable[[], None] | None = None,
) -> EventT:
    """Feed `client` the proxy's bytes until it has its answer.

    Whatever `client` has to send is sent first (nothing, when the request
    went with the connect).

    Args:
        stream: The connection to the proxy.
        client: The sans-I/O client.
        proxy: How messages name the proxy.
        what: What was asked for, for the time-out's message (formatted
            only then).
        started: When the outbound's set-up began (trio time), before
            the connect to the proxy.
        timeout: Seconds for the whole set-up from `started`, the connect
            included (the outbound's `connect_timeout`: one time-out, so a
            silent proxy fails a flow when the held SYN would); the proxy
            answers once its own connect is done, so running out means the
            destination did not answer: HOST_UNREACHABLE.
        protocol_error: The error `client` raises on bytes it cannot take.
        max_reads: Reads allowed (each brings at least one byte).
        before_wait: Called each time what `client` had to send is sent and
            the loop is about to wait for the proxy's answer.

    Returns:
        The client's answer event.

    Raises:
        OutboundError: Time-out or a broken answer; `ProxyClosed` when the
            proxy closed or reset the connection.
    """
    deadline = started + timeout
    if trio.current_effective_deadline() < deadline:
        # An enclosing deadline comes first, so ours could never fire: no
        # scope of our own (a cost once per connection).
        return await _exchange(stream, client, proxy, protocol_error, max_reads, before_wait)
    with trio.CancelScope(deadline=deadline):
        return await _exchange(stream, client, proxy, protocol_error, max_reads, before_wait)
    raise OutboundError(
        FailureReply.HOST_UNREACHABLE,
        f"{proxy} did not answer for {what} within {timeout:g}s",
        proxy_failed=True,
    )


async def _exchange(
    stream: NowaitStream,
    client: HandshakeClient[EventT],
    proxy: str,
    protocol_error: type[Exception],
    max_reads: int,
    before_wait: Callable[[], None] | None,
) -> EventT:
    for _ in range(max_reads):
        try:
            event = client.next_event_untrusted()
            out = client.data_to_send()
            if out:
                # The handshake's receives yield; its sends need not.
                sent = stream.send_nowait(out)
                if sent < len(out):
                    await stream.send_all(out[sent:])
            if event is not NEED_DATA:
                return event
            if before_wait is not None:
                before_wait()
            # The proxy answers what we just sent: it is not there yet.
            data = await stream.receive_after_wait(4096)
        except protocol_error as exc:
            raise OutboundError(
                FailureReply.RESET, f"{proxy} broke the protocol: {exc}", proxy_failed=True
            ) from exc
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) else None
            raise ProxyClosed(
                FailureReply.RESET,
                f"{proxy} dropped the connection: {reason or exc}",
                proxy_failed=True,
            ) from exc
        if not data:
            raise ProxyClosed(
                FailureReply.RESET,
                f"{proxy} closed the connection during the handshake",
                proxy_failed=True,
            )
        client.receive_data(data)
    raise OutboundError(FailureReply.RESET, f"{proxy} sent an endless handshake", proxy_failed=True)


async def open_tunnel(
    server: Destination,
    options: SocketOptions,
    client: OneRequestClient[EventT],
    *,
    fast_open: bool,
    proxy: str,
    what: str,
    protocol_error: type[Exception],
    max_reads: int,
) -> tuple[TcpSocketStream, EventT]:
    """Connect to the proxy with `client`'s request and read its answer.

    The request goes with the connect (in the SYN with `fast_open` and a
    cookie). The caller judges the answer and owns the stream. Connect
    and answer together get `options.connect_timeout`.

    Raises:
        OutboundError: The proxy is unreachable ("unreachable" in the
            message), or as `run_handshake`.
    """
    started = trio.current_time()
    try:
        stream = await open_tcp(
            server.host,
            server.port,
            options,
            early_data=client.data_to_send(),
            fast_open=fast_open,
        )
    except OutboundError as exc:
        raise OutboundError(exc.reply, f"{proxy} unreachable: {exc}", proxy_failed=True) from exc
    try:
        answer = await run_handshake(
            stream,
            client,
            proxy=proxy,
            what=what,
            started=started,
            timeout=options.connect_timeout,
            protocol_error=protocol_error,
            max_reads=max_reads,
        )
    except BaseException:
        stream.close_now()
        raise
    return stream, answer
