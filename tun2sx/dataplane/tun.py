"""The TUN device: opening or adopting it, and moving packets in batches.

A TUN is opened by name (created if missing) with python-pytun, or adopted
from a file descriptor someone else opened (Android's VpnService hands one
over). Reads drain the device until EAGAIN before waiting again, so one
wakeup carries many packets (after the first packet a `poll(0)` asks
whether there is more: a batch of one ends without a failed read).

With offload on, the device is opened with IFF_VNET_HDR and TUNSETOFFLOAD:
every packet then carries a 10-byte virtio-net header. The kernel may hand
us TCP super-segments of up to 64 KB (TSO) whose checksum is only partial
(NEEDS_CSUM), and it accepts the same from us: we write large segments with
only the pseudo-header sum filled in, and the kernel finishes the checksum or
segments as needed. Python then never checksums a payload.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
from typing import Any, NamedTuple

import trio

from stack.netstack import GsoPacket

# ioctl numbers from <linux/if_tun.h> (_IOW('T', n, int) / _IOR('T', n, int)).
TUNSETIFF = 0x400454CA
SIOCGIFMTU = 0x8921
SIOCSIFTXQLEN = 0x8943
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset; native byte order (little-endian hosts, no TUNSETVNETBE).
VNET_HDR = struct.Struct("=BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

_PLAIN_VNET_HDR = bytes(VNET_HDR_LEN)
_READ_SIZE = 65536 + VNET_HDR_LEN
# The device's transmit queue (packets the kernel hands us) when tun2sx
# creates the device: the kernel's default of 500 dropped 8,928 of a local
# burst of 10,000 DNS queries before the reader woke. Only a limit: each
# queued packet is held anyway until read.
DEFAULT_TXQUEUELEN = 10000
# A read failing with one of these means the device is gone: deleted while
# we run (EBADFD: the fd outlives the interface, and polls readable for
# ever), or its fd closed under us. Any other error loses one packet.
_DEVICE_GONE = frozenset({errno.EBADF, errno.EBADFD, errno.ENODEV})
_QUEUE_FULL = frozenset({errno.EAGAIN, errno.ENOBUFS})


class TunError(OSError):
    """The TUN device could not be opened, configured or used."""


class RxPacket(NamedTuple):
    """One packet read from the device.

    Attributes:
        data: the IP packet.
        checksum_trusted: the kernel vouched for the checksums (NEEDS_CSUM
            or DATA_VALID), so the stack must not verify them: a partial
            checksum would fail verification.
    """

    data: memoryview
    checksum_trusted: bool


class TunDevice:
    """An open TUN file descriptor, non-blocking, with optional offloads.

    Use `open_tun` or `adopt_tun` to get one; `close()` releases it (an
    adopted fd is closed too: ownership passes to the device).
    """

    __slots__ = (
        "_closed",
        "_fd",
        "_keep",
        "_poll",
        "mtu",
        "name",
        "offload",
        "rx_bytes",
        "rx_packets",
        "statistics_rx_errors",
        "statistics_tx_drops",
        "statistics_tx_errors",
        "tx_bytes",
        "tx_packets",
    )

    def __init__(self, fd: int, *, name: str, mtu: int, offload: bool, keep: object = None):
        self._fd = fd
        self._keep = keep  # the pytun object owning the fd, kept alive with us
        self._closed = False
        self.name = name
        self.mtu = mtu
        self.offload = offload
        self.statistics_rx_errors = 0
        self.statistics_tx_errors = 0
        self.statistics_tx_drops = 0
        # Packets and IP bytes (without the virtio-net header) read from and
        # written to the device: the traffic an embedder's status screen and
        # the /stats endpoint show.
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        os.set_blocking(fd, False)
        # Whether packets are queued, without reading one (`read_ready`).
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def fileno(self) -> int:
        return self._fd

    # The read system call; a test's fault-injecting device overrides it.
    _read_packet = staticmethod(os.read)

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        """Wait until readable, then read packets until EAGAIN or `limit`.

        A failed read (EIO, EFAULT...) loses that packet, like a wire would:
        it is counted in `statistics_rx_errors` and the batch ends there.

        Raises:
            TunError: the device is gone (deleted, or its fd closed).
        """
        await trio.lowlevel.wait_readable(self._fd)
        return self.read_ready(limit)

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        """The packets the device holds now, up to `limit`, without waiting.

        `read_batch` after its wait; also what a flow takes right after
        writing a packet that the application's kernel answers inline (see
        `Engine.take_ready`). Raises as `read_batch`.
        """
        out: list[RxPacket] = []
        fd = self._fd
        offload = self.offload
        read = self._read_packet
        count = nbytes = 0
        while count < limit:
            if count == 1 and not self._poll.poll(0):
                # A batch of one is the common one (a round trip's request,
                # an ACK): asking whether more is queued costs a third of
                # the read that would fail (its EAGAIN is an exception).
                # A longer batch reads on until a read fails, as before.
                break
            try:
                raw = read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _DEVICE_GONE:
                    raise TunError(
                        f"TUN device {self.name} is gone (deleted or closed): {exc.strerror}"
                    ) from exc
                self.statistics_rx_errors += 1
                break
            if offload:
                if len(raw) <= VNET_HDR_LEN:
                    self.statistics_rx_errors += 1
                    continue
                trusted = bool(raw[0] & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID))
                out.append(RxPacket(memoryview(raw)[VNET_HDR_LEN:], trusted))
                nbytes += len(raw) - VNET_HDR_LEN
            else:
                out.append(RxPacket(memoryview(raw), False))
                nbytes += len(raw)
            count += 1
        self.rx_packets += count
        self.rx_bytes += nbytes
        return out

    def write(self, packet: bytes | bytearray | memoryview | GsoPacket) -> None:
        """Write one IP packet; drops it if the kernel refuses.

        A full queue drops and counts in `statistics_tx_drops`; a device
        that is down (EIO) or gone drops and counts in
        `statistics_tx_errors`: a gone device is the
        reader's to report (its next read fails at once), and a flow
        writing into it must not fail on its own.

        With offload on, a virtio-net header is prepended describing a
        partial checksum and, for TCP segments larger than the MTU allows
        (or than a `GsoPacket`'s packet size), the GSO segment size.
        """
        if type(packet) is GsoPacket:
            data, size = packet
        else:
            data, size = packet, self.mtu  # type: ignore[assignment]
        try:
            if self.offload:
                os.writev(self._fd, (_vnet_header_for(data, size), data))
            else:
                os.write(self._fd, data)
            self.tx_packets += 1
            self.tx_bytes += len(data)
        except OSError as exc:
            if exc.errno in _QUEUE_FULL:
                # The packet is lost like on a wire; TCP retransmits and UDP
                # never promised delivery.
                self.statistics_tx_drops += 1
                return
            if exc.errno != errno.EIO and exc.errno not in _DEVICE_GONE:
                raise
            self.statistics_tx_errors += 1

    def queue_drops(self) -> int:
        """Packets the kernel dropped because its queue towards us was full
        (the device's `tx_dropped`: we read too slowly for a burst); 0 when
        unreadable. Counts for the whole device, every queue."""
        try:
            with open(f"/sys/class/net/{self.name}/statistics/tx_dropped", "rb") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._keep is not None:
            self._keep.close()  # type: ignore[attr-defined]
        else:
            os.close(self._fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vnet_header_for(packet: bytes | bytearray | memoryview, mtu: int) -> bytes:
    """The virtio-net header for a packet we built with a partial checksum.

    The packet layer writes TCP and UDP packets with only the pseudo-header
    sum in the checksum field when offload is on; the header tells the
    kernel where to finish it, and for a TCP segment longer than the MTU,
    how to cut it (GSO). ICMP and fragments (IPv4 with MF or an offset;
    IPv6 ones show the Fragment header as their protocol) carry a full
    checksum and a plain header.
    """
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) << 2
        proto = packet[9]
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    elif version == 6:
        ihl = 40
        proto = packet[6]
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    else:
        return _PLAIN_VNET_HDR
    if proto == 6:
        hdr_len = ihl + ((packet[ihl + 12] >> 4) << 2)
        if len(packet) > mtu:
            return VNET_HDR.pack(
                VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, mtu - hdr_len, ihl, 16
            )
        return VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, hdr_len, 0, ihl, 16)
    if proto == 17:
        if version == 4 and (packet[6] & 0x3F or packet[7]):
            return _PLAIN_VNET_HDR  # a fragment: its checksum is already whole
        return VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, ihl, 6)
    return _PLAIN_VNET_HDR


def _set_offload(fd: int, offload: bool) -> None:
    if not offload:
        return
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)


def open_tun(
    name: str,
    *,
    mtu: int | None = None,
    offload: bool = True,
    addresses: tuple[str, ...] = (),
    up: bool = True,
    txqueuelen: int | None = DEFAULT_TXQUEUELEN,
) -> TunDevice:
    """Open (creating if missing) the TUN device `name`.

    Args:
        name: interface name, e.g. ``tun0``.
        mtu: set the interface MTU when given.
        offload: negotiate the virtio-net header with checksum and TSO
            offloads.
        addresses: CIDR addresses to add (``10.0.0.1/24``, ``fd00::1/64``).
        up: bring the interface up.
        txqueuelen: the length of the kernel's queue of packets waiting for
            us to read them (None: leave it as it is).

    Raises:
        TunError: the device cannot be opened or configured.
    """
    return open_tun_queues(
        name, 1, mtu=mtu, offload=offload, addresses=addresses, up=up, txqueuelen=txqueuelen
    )[0]


def open_tun_queues(
    name: str,
    queues: int,
    *,
    mtu: int | None = None,
    offload: bool = True,
    addresses: tuple[str, ...] = (),
    up: bool = True,
    txqueuelen: int | None = DEFAULT_TXQUEUELEN,
) -> list[TunDevice]:
    """Open `name` with `queues` queues, one device object per queue.

    With more than one queue the interface is multi-queue
    (IFF_MULTI_QUEUE): the kernel spreads the packets it sends into the TUN
    over the queues by a symmetric flow hash, so every packet of one flow
    comes out of the same queue, and a packet written to any queue is
    received the same. A queue whose fd is closed leaves the set and the
    kernel spreads over the others. An existing single-queue interface of
    that name cannot take more queues (the kernel refuses the flags).

    Arguments as for `open_tun`.

    Raises:
        TunError: the device cannot be opened or configured.
    """
    import pytun

    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload else 0)
    if queues > 1:
        flags |= pytun.IFF_MULTI_QUEUE
    opened: list[Any] = []  # pytun devices (untyped)

    def close_all() -> None:
        for dev in opened:
            dev.close()

    try:
        for _ in range(queues):
            # The first open may create the interface; the others attach
            # queues to it, by the name the kernel gave it.
            dev = pytun.TunTapDevice(name=opened[0].name if opened else name, flags=flags)
            opened.append(dev)
    except (pytun.Error, OSError) as exc:
        close_all()
        what = "TUN device" if queues == 1 else f"TUN device with {queues} queues"
        raise TunError(f"cannot open {what} {name!r}: {exc}") from exc
    first = opened[0]
    try:
        for dev in opened:
            _set_offload(dev.fileno(), offload)
        if mtu is not None:
            first.mtu = mtu
        if txqueuelen is not None:
            set_txqueuelen(first.name, txqueuelen)
        for cidr in addresses:
            # `replace`: a persistent device keeps its addresses between runs.
            _ip("addr", "replace", cidr, "dev", first.name)
        if up:
            first.up()
        actual_mtu = first.mtu
    except (pytun.Error, OSError) as exc:
        close_all()
        raise TunError(f"cannot configure TUN device {name!r}: {exc}") from exc
    return [
        TunDevice(dev.fileno(), name=dev.name, mtu=actual_mtu, offload=offload, keep=dev)
        for dev in opened
    ]


def adopt_tun(fd: int, *, mtu: int | None = None) -> TunDevice:
    """Take over an already-open TUN fd (VpnService style).

    The offload mode is read from the device's own flags, so a descriptor
    opened with IFF_VNET_HDR keeps working; Android's has no such header.
    The MTU is the interface's own unless given (a VpnService may not let
    us read it).
    """
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as exc:
        raise TunError(f"fd {fd} is not a TUN device: {exc}") from exc
    name = ifr[:16].split(b"\0", 1)[0].decode(errors="replace")
    (flags,) = struct.unpack_from("H", ifr, 16)
    if not flags & IFF_TUN:
        raise TunError(f"fd {fd} ({name}) is a TAP device, not TUN")
    if mtu is None:
        mtu = _interface_mtu(name)
    return TunDevice(fd, name=name, mtu=mtu, offload=bool(flags & IFF_VNET_HDR))


def set_txqueuelen(name: str, length: int) -> None:
    """Set interface `name`'s transmit queue length (SIOCSIFTXQLEN).

    For a TUN that queue holds the packets the kernel has for us; the
    kernel resizes each queue's ring at once.

    Raises:
        OSError: the kernel refused (no CAP_NET_ADMIN, a bad length).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFTXQLEN, struct.pack("16si", name.encode(), length))


def _interface_mtu(name: str, default: int = 1500) -> int:
    """The MTU of interface `name` (SIOCGIFMTU), or `default` if unreadable."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            ifr = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, struct.pack("16si", name.encode(), 0))
    except OSError:
        return default
    return int(struct.unpack_from("i", ifr, 16)[0])


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TunError(f"ip {' '.join(args)}: {result.stderr.strip()}")
