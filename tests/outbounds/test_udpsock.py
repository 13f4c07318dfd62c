"""The outbounds' UDP socket: batches, sends that never wait, and the drops it reports.

Real kernel sockets on loopback; no root needed. The full-buffer sends are
a socket whose `send` fails the way a full queue does (loopback delivers
synchronously and is never full).
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio
import trio.testing

from outbounds.net import SocketOptions, open_udp_socket
from outbounds.udpsock import UdpSocket


def pair() -> tuple[UdpSocket, socket.socket]:
    ours = open_udp_socket(socket.AF_INET, SocketOptions(udp_buffer=None))
    ours.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    ours.connect(peer.getsockname())
    peer.connect(ours.socket.getsockname())
    return ours, peer


async def test_a_burst_is_one_batch_after_one_wait() -> None:
    ours, peer = pair()
    with ours.socket, peer:
        assert ours.receive_batch_nowait(10) == []
        for i in range(30):
            peer.send(b"d%d" % i)
        await ours.wait_readable()
        assert ours.receive_batch_nowait(20) == [b"d%d" % i for i in range(20)]
        assert ours.receive_batch_nowait(20) == [b"d%d" % i for i in range(20, 30)]
        assert ours.send_nowait(b"back")
        assert peer.recv(10) == b"back"


async def test_an_overflowing_receive_buffer_is_counted() -> None:
    ours, peer = pair()
    with ours.socket, peer:
        ours.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = 200
        for _ in range(sent):
            peer.send(bytes(1200))
        received = len(ours.receive_batch_nowait(1000))
        drops = ours.receive_drops()
        assert received < sent  # the buffer held a few datagrams only
        assert received + drops == sent  # and the kernel counted every one it dropped


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOBUFS])
def test_a_full_queue_drops_the_datagram_and_counts_it(code: int) -> None:
    class Full(socket.socket):
        def send(self, data: object, flags: int = 0) -> int:
            raise OSError(code, os.strerror(code))

        def sendto(self, data: object, *args: object) -> int:
            raise OSError(code, os.strerror(code))

    sock = UdpSocket(Full(socket.AF_INET, socket.SOCK_DGRAM))
    with sock.socket:
        assert sock.send_nowait(b"x") is False
        assert sock.sendto_nowait(b"x", ("127.0.0.1", 9)) is False
        assert sock.send_drops == 2


def test_other_send_errors_are_raised() -> None:
    ours, peer = pair()
    port = peer.getsockname()[1]
    peer.close()
    with ours.socket:
        # The first send draws an ICMP port unreachable; the next reports it.
        ours.send_nowait(b"x")
        with pytest.raises(ConnectionRefusedError):
            for _ in range(3):
                ours.send_nowait(b"x")
        assert ours.send_drops == 0
    assert port


def test_buffers_are_sized_as_asked() -> None:
    sock = open_udp_socket(socket.AF_INET, SocketOptions(udp_buffer=1 << 20))
    with sock.socket:
        # Linux reports double what was asked (its bookkeeping overhead).
        got = sock.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if os.geteuid() == 0:
            assert got == 2 << 20
        else:
            assert got >= 2 * 4096
        assert sock.receive_drops() == 0
    assert sock.receive_drops() == 0  # closed: nothing to ask


async def test_waiting_forms_still_work() -> None:
    ours, peer = pair()
    with ours.socket, peer:
        await ours.send(b"one")
        assert peer.recv(10) == b"one"
        peer.send(b"two")
        assert await ours.receive() == b"two"
        await trio.lowlevel.checkpoint()


async def test_a_batch_already_waiting_is_still_a_checkpoint() -> None:
    ours, peer = pair()
    with ours.socket, peer:
        peer.send(b"ready")
        # The data is there at once, and yet other tasks get their turn.
        with trio.testing.assert_checkpoints():
            assert await ours.receive_batch(8) == [b"ready"]
        peer.send(b"later")
        with trio.testing.assert_checkpoints():
            assert await ours.receive_from_batch(8) == [(b"later", peer.getsockname())]


def test_an_error_after_a_batch_began_is_raised_by_the_next_call() -> None:
    class Failing(socket.socket):
        """Two datagrams, then the error an ICMP unreachable leaves behind."""

        script: list[bytes | OSError] = [b"one", b"two", ConnectionRefusedError()]

        def recv(self, size: int, flags: int = 0) -> bytes:
            step = self.script.pop(0) if self.script else BlockingIOError()
            if isinstance(step, OSError):
                raise step
            return step

    sock = UdpSocket(Failing(socket.AF_INET, socket.SOCK_DGRAM))
    with sock.socket:
        assert sock.receive_batch_nowait(10) == [b"one", b"two"]
        with pytest.raises(ConnectionRefusedError):  # reported, not lost
            sock.receive_batch_nowait(10)
        assert sock.receive_batch_nowait(10) == []
