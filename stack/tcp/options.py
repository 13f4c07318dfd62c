"""Option negotiation on the handshake: MSS, window scale, SACK, timestamps.

The application offers options in its SYN; we answer in the SYN-ACK with
the ones we support, and each is in force only when both sides sent it
(RFC 7323 sections 2.2 and 3.2, RFC 2018 section 2). The result is one
`Negotiated` value the connection reads from then on.
"""

from __future__ import annotations

from stack.tcp.config import TcpConfig
from stack.wire.tcp import TcpOptions

# RFC 9293 section 3.7.1 / RFC 8200 section 5: the MSS to assume when the
# SYN carries none.
DEFAULT_MSS_V4 = 536
DEFAULT_MSS_V6 = 1220
MAX_WSCALE = 14  # RFC 7323 section 2.3
TIMESTAMP_OPTION_LEN = 12  # NOP NOP kind len TSval TSecr, on every segment


class Negotiated:
    """What the handshake settled.

    Never changed once made: connections whose SYNs offered the same
    options share one (`TcpDemux.accept`).

    Attributes:
        mss: the MSS we announce (the configured one for the flow's family).
        snd_mss: payload bytes per segment we send (the peer's MSS, capped
            by ours, minus the timestamp option if in use: RFC 6691).
        rcv_mss: payload bytes per segment we expect (for delayed ACK).
        snd_wscale: shift applied to window fields the peer sends.
        rcv_wscale: shift applied to window fields we send.
        sack: SACK in use both ways.
        timestamps: timestamps in use both ways.
    """

    __slots__ = ("mss", "rcv_mss", "rcv_wscale", "sack", "snd_mss", "snd_wscale", "timestamps")

    def __init__(
        self,
        mss: int,
        snd_mss: int,
        rcv_mss: int,
        snd_wscale: int,
        rcv_wscale: int,
        sack: bool,
        timestamps: bool,
    ) -> None:
        self.mss = mss
        self.snd_mss = snd_mss
        self.rcv_mss = rcv_mss
        self.snd_wscale = snd_wscale
        self.rcv_wscale = rcv_wscale
        self.sack = sack
        self.timestamps = timestamps


def window_shift(rcv_buf: int) -> int:
    """Return the smallest shift that lets a 16-bit field cover `rcv_buf`."""
    shift = 0
    while shift < MAX_WSCALE and (rcv_buf >> shift) > 0xFFFF:
        shift += 1
    return shift


def negotiate(syn: TcpOptions, config: TcpConfig, ipv6: bool) -> Negotiated:
    """Settle the options from the application's SYN and our configuration.

    Args:
        syn: options of the application's SYN.
        config: our configuration.
        ipv6: whether the flow is IPv6 (the default MSS, and ours).

    Returns:
        The negotiated parameters.
    """
    timestamps = config.timestamps and syn.timestamp is not None
    peer_mss = syn.mss if syn.mss else (DEFAULT_MSS_V6 if ipv6 else DEFAULT_MSS_V4)
    ts_len = TIMESTAMP_OPTION_LEN if timestamps else 0
    mss = config.mss_ipv6 if ipv6 and config.mss_ipv6 is not None else config.mss
    # Never below 64 bytes of payload: a silly MSS would only burn CPU.
    snd_mss = max(64, min(peer_mss, mss) - ts_len)
    rcv_mss = max(64, mss - ts_len)
    if config.window_scaling and syn.wscale is not None:
        snd_wscale = min(syn.wscale, MAX_WSCALE)
        rcv_wscale = window_shift(config.rcv_buf)
    else:
        snd_wscale = rcv_wscale = 0
    return Negotiated(
        mss=mss,
        snd_mss=snd_mss,
        rcv_mss=rcv_mss,
        snd_wscale=snd_wscale,
        rcv_wscale=rcv_wscale,
        sack=config.sack and syn.sack_permitted,
        timestamps=timestamps,
    )


def synack_options(
    neg: Negotiated, syn: TcpOptions, config: TcpConfig, tsval: int, ts_recent: int
) -> TcpOptions:
    """Return the options of our SYN-ACK: only what the SYN offered.

    Args:
        neg: the negotiated parameters.
        syn: options of the application's SYN (window scale is answered
            whenever the SYN carried one, even with a shift of 0).
        config: our configuration.
        tsval: our timestamp clock now.
        ts_recent: the TSval to echo.
    """
    scaled = config.window_scaling and syn.wscale is not None
    return TcpOptions(
        mss=neg.mss,
        wscale=neg.rcv_wscale if scaled else None,
        sack_permitted=neg.sack,
        timestamp=(tsval, ts_recent) if neg.timestamps else None,
    )
