"""Tunables of the TCP stack, in one frozen value passed to every connection.

There is no global configuration: the runtime builds one `TcpConfig` (for
example with `mss` derived from the TUN MTU) and hands it to the demux,
which hands it to each connection. Times are in seconds.
"""

from __future__ import annotations

import attrs

from stack.errors import LocalProtocolError


@attrs.frozen(slots=True)
class TcpConfig:
    """Limits and timers of the TCP stack.

    Attributes:
        mss: the largest payload we accept per segment (announced in the
            SYN-ACK) and the cap on what we send; set from the TUN MTU
            (MTU minus 40 for IPv4, 60 for IPv6).
        mss_ipv6: the same for IPv6 flows, whose header is 20 bytes
            longer; None: `mss` for both families.
        rcv_buf: receive buffer per connection: in-order data not yet taken
            by `next_event`. The advertised window is what is left of it.
        snd_buf: send buffer per connection: unacknowledged plus unsent data.
        max_ooo_bytes: cap on out-of-order data held per connection.
        max_ooo_ranges: cap on separate out-of-order ranges (CPU bound).
        rto_initial: RTO before the first RTT sample (RFC 6298 says 1 s).
        rto_min: lower bound of the RTO (200 ms, as Linux, not RFC's 1 s).
        rto_max: upper bound of the RTO after backoff.
        delayed_ack: how long an ACK may be held back (RFC 9293: < 0.5 s).
        time_wait: how long TIME-WAIT lasts ("short": no 2*MSL of minutes,
            the flows are local and the port space is the application's).
        syn_received_timeout: give up on a handshake after this long.
        max_retries: consecutive RTO expiries (or unanswered probes) before
            the connection is reset.
        idle_timeout: reset a connection with no segment received for this
            long; None disables it.
        keepalive_time: idle time before keep-alive probes start; None
            disables keep-alive.
        keepalive_interval: time between keep-alive probes.
        keepalive_probes: unanswered keep-alive probes before a reset.
        max_half_open: cap on pending SYNs plus SYN-RECEIVED connections.
        max_pending_per_destination: cap on the pending SYNs (connects
            the runtime is still dialing) to one address and port, so a
            flood towards one destination leaves room for the others; a
            quarter of `max_half_open` by default.
        max_pending_per_source: the same per application address. Every
            application on this host usually shares one source address,
            so it is half of `max_half_open` by default: a flood from one
            source leaves the other half to the rest.
        max_connections: cap on all connections in the demux.
        initial_cwnd_segments: initial congestion window (RFC 6928: 10).
        gso_size: when set, the largest payload of a data segment we emit,
            even above the peer's MSS: the device cuts it into MSS-sized
            packets (TSO/GSO), so one segment can carry 64 KB. None sends
            segments of the negotiated MSS.
        window_scaling: offer window scaling when the peer does.
        sack: accept SACK-permitted from the peer.
        timestamps: accept timestamps from the peer.
        loss_floor: on a loss, keep the window at or above twice the
            measured bandwidth-delay product instead of always halving it
            (SACK connections; see `congestion`). False: plain NewReno.
        challenge_ack_interval: a connection sends at most one challenge
            ACK (RFC 5961: in-window RST or SYN, ACK older than the window)
            per this interval; the rest are counted, not sent (RFC 5961
            section 7; Linux's `tcp_invalid_ratelimit`, 500 ms).
    """

    mss: int = 1460
    mss_ipv6: int | None = None
    rcv_buf: int = 512 * 1024
    snd_buf: int = 512 * 1024
    max_ooo_bytes: int = 512 * 1024
    max_ooo_ranges: int = 64
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 60.0
    delayed_ack: float = 0.04
    time_wait: float = 1.0
    syn_received_timeout: float = 30.0
    max_retries: int = 12
    idle_timeout: float | None = 7200.0
    keepalive_time: float | None = None
    keepalive_interval: float = 75.0
    keepalive_probes: int = 9
    max_half_open: int = 1024
    max_pending_per_destination: int = 256
    max_pending_per_source: int = 512
    max_connections: int = 16384
    initial_cwnd_segments: int = 10
    gso_size: int | None = None
    window_scaling: bool = True
    sack: bool = True
    timestamps: bool = True
    loss_floor: bool = True
    challenge_ack_interval: float = 0.5

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(TcpConfig):
            value = getattr(self, field.name)
            if type(value) in (int, float) and value <= 0:
                raise LocalProtocolError(f"TcpConfig.{field.name} must be positive, got {value}")
        if self.mss > 65495:
            raise LocalProtocolError(f"TcpConfig.mss {self.mss} exceeds 65495")
        if self.mss_ipv6 is not None and self.mss_ipv6 > 65475:
            raise LocalProtocolError(f"TcpConfig.mss_ipv6 {self.mss_ipv6} exceeds 65475")
        if self.gso_size is not None and self.gso_size > 65000:
            raise LocalProtocolError(f"TcpConfig.gso_size {self.gso_size} exceeds 65000")
        if self.rto_min > self.rto_max:
            raise LocalProtocolError("TcpConfig.rto_min exceeds rto_max")
        if self.rcv_buf > (0xFFFF << 14):
            raise LocalProtocolError("TcpConfig.rcv_buf exceeds the largest scaled window")
