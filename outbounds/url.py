"""Outbound URLs: one place that turns `scheme://...` into an outbound.

    socks5://[user:pass@]host:port     SOCKS5 (RFC 1928/1929)
    socks4://[userid@]host:port        SOCKS4 (IPv4 destinations only)
    socks4a://[userid@]host:port       SOCKS4a (host names resolved by the proxy)
    http://[user:pass@]host:port       HTTP CONNECT (RFC 9110), Basic auth (RFC 7617)
    ss://BASE64URL(method:pass)@host:port  Shadowsocks (SIP002; AEAD and 2022)
    ss://method:pass@host:port         the same, password percent-encoded
    direct://                          connect from this host

`?tfo=1` on a proxy URL asks for TCP Fast Open to the proxy; `?pipeline=1`
on a SOCKS5 URL sends its handshake in one write.

Errors are `ValueError`s whose message says what is wrong with the URL.
"""

from __future__ import annotations

from outbounds.base import Outbound, redact_url
from outbounds.direct import DirectOutbound
from outbounds.net import SocketOptions
from outbounds.resolver import DirectResolver
from outbounds.socks5 import parse_socks5_url

SCHEMES = ("socks5", "socks5h", "socks4", "socks4a", "http", "ss", "direct")


def parse_outbound_url(
    url: str,
    socket_options: SocketOptions | None = None,
    *,
    resolver: DirectResolver | None = None,
) -> Outbound:
    """Build the outbound a URL names; `direct://` resolves names with `resolver`.

    Raises:
        ValueError: unknown scheme or a malformed URL.
    """
    scheme, sep, _rest = url.partition("://")
    if not sep and url != "direct":
        raise ValueError(f"not a URL: {redact_url(url)!r} (expected scheme://...)")
    scheme = scheme.lower()
    if scheme == "direct":
        return DirectOutbound(socket_options=socket_options or SocketOptions(), resolver=resolver)
    if scheme in ("socks5", "socks5h"):
        return parse_socks5_url(url, socket_options)
    # Imported here, like Shadowsocks below: a run loads only the proxy
    # protocols its configuration names (memory, tests/tun2sx/control/test_lazy_imports.py).
    if scheme in ("socks4", "socks4a"):
        from outbounds.socks4 import parse_socks4_url

        return parse_socks4_url(url, socket_options)
    if scheme == "http":
        from outbounds.http import parse_http_url

        return parse_http_url(url, socket_options)
    if scheme == "ss":
        # Here, not at the top: Shadowsocks brings cryptography and blake3
        # (about 9 MiB resident), which a configuration without it never needs.
        from outbounds.shadowsocks import parse_shadowsocks_url

        return parse_shadowsocks_url(url, socket_options)
    raise ValueError(
        f"unsupported scheme {scheme!r} in {redact_url(url)!r} (known: {', '.join(SCHEMES)})"
    )
