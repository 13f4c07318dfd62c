"""The parts every proxy URL shares: scheme, credentials, host, port, flags.

SOCKS4, SOCKS5 and HTTP proxies are all written `scheme://[user[:pass]@]host:port[?flag=0|1...]`;
this module takes such a URL apart once, with one wording for every
complaint, and never shows the password in a message (`redact_url`).
"""

from __future__ import annotations

import urllib.parse

import attrs

from .base import redact_url

__all__ = ["UNSPLITTABLE", "ProxyUrl", "split_proxy_url"]

UNSPLITTABLE = "not a URL (unbalanced [ ] or characters that are not allowed in a host)"


@attrs.frozen
class ProxyUrl:
    """A proxy URL taken apart.

    Attributes:
        scheme: The scheme, lower case.
        host: Host name or address literal (IPv6 without brackets).
        port: The port, 1..65535.
        username: Percent-decoded user name, or None.
        password: Percent-decoded password, or None (also when the URL had
            a user name without a colon).
        flags: The `?name=0|1` switches given, by name.
    """

    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None
    flags: dict[str, bool]


def split_proxy_url(
    url: str, kind: str, schemes: tuple[str, ...], flags: tuple[str, ...]
) -> ProxyUrl:
    """Take a proxy URL apart, checking what every proxy URL must have.

    Args:
        url: The URL.
        kind: What the messages call it ("SOCKS5", "HTTP proxy").
        schemes: Schemes accepted (lower case).
        flags: Query switches accepted, each `name=0|1`.

    Returns:
        The parts; credentials are checked by the caller (each protocol has
        its own rules).

    Raises:
        ValueError: One line naming what is wrong, never the password.
    """
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        # urllib's own message may quote the whole netloc, password and all.
        raise ValueError(f"{kind} URL {shown!r}: {UNSPLITTABLE}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError(
            f"{kind} URL {shown!r}: scheme must be {' or '.join(s + '://' for s in schemes)}"
        )
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"{kind} URL {shown!r}: unexpected path or fragment")
    given: dict[str, bool] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in flags or value not in ("0", "1"):
            known = ", ".join(f"{flag}=0|1" for flag in flags) or "none"
            raise ValueError(
                f"{kind} URL {shown!r}: unexpected query {key}={value}; known: {known}"
            )
        given[key] = value == "1"
    if not parts.hostname:
        raise ValueError(f"{kind} URL {shown!r}: missing host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{kind} URL {shown!r}: port is not a number in 0..65535") from None
    if port is None or port == 0:
        raise ValueError(f"{kind} URL {shown!r}: missing port")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return ProxyUrl(scheme, parts.hostname, port, username, password, given)
