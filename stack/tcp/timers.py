"""Time for one connection: the RTO estimator and the set of deadlines.

The connection never reads a clock: every entry point receives `now`, and
`Timers.earliest` tells the caller when to come back. Each timer is just an
absolute deadline or None; there is no tick.

`RttEstimator` is RFC 6298: SRTT and RTTVAR smoothing, RTO = SRTT +
max(G, 4 * RTTVAR) clamped to [rto_min, rto_max], doubled on every expiry
(section 5.5) and kept backed off until a new sample arrives (section 5.7).
"""

from __future__ import annotations

_CLOCK_GRANULARITY = 0.001  # G: our timestamps count milliseconds
_TLP_SLACK = 0.002  # Linux adds two ticks to 2*SRTT
_WORST_DELAYED_ACK = 0.2  # RFC 8985 WCDelAckT, when one packet is in flight


MAX_TAIL_PROBES = 2  # per flight, until forward progress (see snd)


def probe_timeout(srtt: float, flight: int, wire_mss: int) -> float:
    """Return the tail loss probe timeout (RFC 8985 section 7.2).

    A lone packet in flight may legitimately wait for the peer's delayed
    ACK, so the probe then waits for that too.
    """
    pto = 2 * srtt + _TLP_SLACK
    if flight <= wire_mss:
        pto += _WORST_DELAYED_ACK
    return pto


class RttEstimator:
    """Smoothed RTT and retransmission timeout (RFC 6298).

    Attributes:
        srtt: smoothed RTT, None before the first sample.
        rttvar: RTT variation.
        backoff: number of expiries since the last sample.
    """

    __slots__ = ("_base", "_max", "_min", "backoff", "rttvar", "srtt")

    def __init__(self, initial: float, rto_min: float, rto_max: float) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.backoff = 0
        self._min = rto_min
        self._max = rto_max
        self._base = min(max(initial, rto_min), rto_max)

    def sample(self, rtt: float) -> None:
        """Fold one RTT measurement (seconds) into the estimate."""
        # Once per ACK of a bulk transfer: comparisons, no min/max/abs calls
        # (the same values: a tie gives the same number either way).
        rtt = rtt if rtt > 0.0 else 0.0
        srtt = self.srtt
        if srtt is None:
            srtt = rtt
            rttvar = rtt / 2
        else:
            diff = srtt - rtt
            rttvar = 0.75 * self.rttvar + 0.25 * (diff if diff >= 0.0 else -diff)
            srtt = 0.875 * srtt + 0.125 * rtt
        self.srtt = srtt
        self.rttvar = rttvar
        var = 4 * rttvar
        rto = srtt + (var if var > _CLOCK_GRANULARITY else _CLOCK_GRANULARITY)
        if rto < self._min:
            rto = self._min
        self._base = rto if rto < self._max else self._max
        self.backoff = 0

    def rto(self) -> float:
        """Return the current RTO, including backoff."""
        return min(self._base * (1 << min(self.backoff, 30)), self._max)

    def backed_off(self, count: int) -> float:
        """Return the RTO doubled `count` more times (the persist timer's wait)."""
        return float(min(self.rto() * (1 << min(count, 30)), self._max))


class Timers:
    """Absolute deadlines of one connection; None means not armed.

    Attributes:
        rto: retransmission (also SYN-ACK retransmission).
        delack: a delayed ACK is due.
        persist: a zero-window probe is due.
        keepalive: a keep-alive probe is due.
        idle: the idle timeout fires (reset).
        time_wait: TIME-WAIT ends.
        handshake: SYN-RECEIVED gives up.
        tlp: a tail loss probe is due (RFC 8985 section 7).
        rack: RACK's reordering timer (RFC 8985 section 6.3).
    """

    __slots__ = (
        "delack",
        "handshake",
        "idle",
        "keepalive",
        "persist",
        "rack",
        "rto",
        "time_wait",
        "tlp",
    )

    def __init__(self) -> None:
        self.rto: float | None = None
        self.delack: float | None = None
        self.persist: float | None = None
        self.keepalive: float | None = None
        self.idle: float | None = None
        self.time_wait: float | None = None
        self.handshake: float | None = None
        self.tlp: float | None = None
        self.rack: float | None = None

    def earliest(self) -> float | None:
        """Return the nearest armed deadline, or None."""
        best: float | None = None
        for deadline in (
            self.rto,
            self.delack,
            self.persist,
            self.keepalive,
            self.idle,
            self.time_wait,
            self.handshake,
            self.tlp,
            self.rack,
        ):
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def clear(self) -> None:
        """Disarm every timer."""
        self.rto = self.delack = self.persist = self.keepalive = None
        self.idle = self.time_wait = self.handshake = self.tlp = self.rack = None
