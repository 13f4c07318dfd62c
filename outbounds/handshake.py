"""The read-and-answer loop of a proxy handshake, for the simple proxies.

SOCKS4 and HTTP CONNECT are one request and one answer: their sans-I/O
clients take the proxy's bytes and say NEED_DATA until the answer is whole.
The loop that feeds them, bounds the time and the number of reads, and
turns a dropped or garbled connection into an `OutboundError` is the same
for both, so it lives here once.
"""

from __future__ import annotations

import enum
from typing import Final, Protocol, TypeVar

import trio

from .base import FailureReply, NowaitStream, OutboundError

__all__ = ["NEED_DATA", "HandshakeClient", "run_handshake"]


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""A handshake client needs more bytes from the proxy."""

EventT = TypeVar("EventT", covariant=True)


class HandshakeClient(Protocol[EventT]):
    """What `run_handshake` drives: a sans-I/O client of one exchange."""

    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes | bytearray) -> None: ...

    def next_event_untrusted(self) -> _NeedData | EventT: ...


async def run_handshake(
    stream: NowaitStream,
    client: HandshakeClient[EventT],
    *,
    proxy: str,
    what: str,
    timeout: float,
    protocol_error: type[Exception],
    max_reads: int,
) -> EventT:
    """Feed `client` the proxy's bytes until it has its answer.

    Whatever `client` has to send is sent first (nothing, when the request
    went with the connect).

    Args:
        stream: The connection to the proxy.
        client: The sans-I/O client.
        proxy: How messages name the proxy.
        what: What was asked for, for the time-out's message.
        timeout: Seconds for the whole exchange; the proxy answers once its
            own connect is done, so running out means the destination did
            not answer: HOST_UNREACHABLE.
        protocol_error: The error `client` raises on bytes it cannot take.
        max_reads: Reads allowed (each brings at least one byte).

    Returns:
        The client's answer event.

    Raises:
        OutboundError: Time-out, a dropped connection, or a broken answer.
    """
    with trio.move_on_after(timeout):
        return await _exchange(stream, client, proxy, protocol_error, max_reads)
    raise OutboundError(
        FailureReply.HOST_UNREACHABLE, f"{proxy} did not answer for {what} within {timeout:g}s"
    )


async def _exchange(
    stream: NowaitStream,
    client: HandshakeClient[EventT],
    proxy: str,
    protocol_error: type[Exception],
    max_reads: int,
) -> EventT:
    for _ in range(max_reads):
        try:
            event = client.next_event_untrusted()
            out = client.data_to_send()
            if out:
                sent = stream.send_nowait(out)
                if sent < len(out):
                    await stream.send_all(out[sent:])
            if event is not NEED_DATA:
                return event
            data = await stream.receive_after_wait(4096)
        except protocol_error as exc:
            raise OutboundError(FailureReply.RESET, f"{proxy} broke the protocol: {exc}") from exc
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) else None
            raise OutboundError(
                FailureReply.RESET, f"{proxy} dropped the connection: {reason or exc}"
            ) from exc
        if not data:
            raise OutboundError(
                FailureReply.RESET, f"{proxy} closed the connection during the handshake"
            )
        client.receive_data(data)
    raise OutboundError(FailureReply.RESET, f"{proxy} sent an endless handshake")
