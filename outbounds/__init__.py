"""Ways out of the TUN: each gives trio streams for TCP and a datagram session for UDP.

One module per protocol, each a sans-I/O codec plus a thin async dialer.
`base` holds the contract the runtime relies on (`Destination`, `Outbound`,
`UdpSession`, `OutboundError` with the `FailureReply` the application should
see) and `net` the socket boundary where loop avoidance is applied and OS
errors are translated. This package imports nothing from `tun2sx`.
"""

from typing import TYPE_CHECKING

from .base import Destination, FailureReply, Outbound, OutboundError, UdpSession
from .direct import DirectOutbound
from .net import SocketOptions
from .socks5 import Socks5Outbound, parse_socks5_url

if TYPE_CHECKING:
    from .shadowsocks import ShadowsocksOutbound, parse_shadowsocks_url

__all__ = [
    "Destination",
    "DirectOutbound",
    "FailureReply",
    "Outbound",
    "OutboundError",
    "ShadowsocksOutbound",
    "SocketOptions",
    "Socks5Outbound",
    "UdpSession",
    "parse_shadowsocks_url",
    "parse_socks5_url",
]


def __getattr__(name: str) -> object:
    # Shadowsocks brings cryptography and blake3 (about 9 MiB resident), and
    # importing any outbounds module runs this file: load it on first use.
    if name in ("ShadowsocksOutbound", "parse_shadowsocks_url"):
        from . import shadowsocks

        return getattr(shadowsocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
