"""`ss://` URLs (SIP002): both user-info forms, and one clear error per mistake."""

from __future__ import annotations

import base64
import urllib.parse

import pytest

from outbounds.shadowsocks import ShadowsocksOutbound
from outbounds.url import parse_outbound_url

KEY16 = base64.b64encode(bytes(range(16))).decode()
KEY16_QUOTED = urllib.parse.quote(KEY16, safe="")


def b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("url", "method", "name"),
    [
        (
            f"ss://{b64url('aes-256-gcm:pa:ss@word')}@127.0.0.1:8388",
            "aes-256-gcm",
            "127.0.0.1:8388",
        ),
        (
            f"ss://{b64url('chacha20-ietf-poly1305:x')}@[::1]:8388/#my%20server",
            "chacha20-ietf-poly1305",
            "[::1]:8388",
        ),
        ("ss://aes-128-gcm:p%40ss%3Aw%2Fd@proxy.example:443", "aes-128-gcm", "proxy.example:443"),
        (
            f"ss://2022-blake3-aes-128-gcm:{KEY16_QUOTED}@h:1",
            "2022-blake3-aes-128-gcm",
            "h:1",
        ),
    ],
)
def test_accepted_forms(url: str, method: str, name: str) -> None:
    outbound = parse_outbound_url(url)
    assert isinstance(outbound, ShadowsocksOutbound)
    assert outbound.method == method
    assert outbound.name == f"shadowsocks {method} {name}"


def test_password_survives_both_forms() -> None:
    plain = parse_outbound_url("ss://aes-128-gcm:p%40ss%3Aw%2Fd@h:1")
    encoded = parse_outbound_url(f"ss://{b64url('aes-128-gcm:p@ss:w/d')}@h:1")
    assert isinstance(plain, ShadowsocksOutbound) and isinstance(encoded, ShadowsocksOutbound)
    assert plain._key == encoded._key == ShadowsocksOutbound("h", 1, "aes-128-gcm", "p@ss:w/d")._key


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ss://h:1", "missing method:password@"),
        ("ss://aes-128-gcm:pw@h", "missing port"),
        ("ss://aes-128-gcm:pw@h:99999", "port is not a number"),
        ("ss://aes-128-gcm:pw@:1", "missing host"),
        ("ss://%%%@h:1", "neither method:password nor base64"),
        (f"ss://{b64url('aes-128-gcm')}@h:1", "must be method:password"),
        ("ss://rc4-md5:pw@h:1", "unsupported Shadowsocks method 'rc4-md5'"),
        ("ss://2022-blake3-aes-256-gcm:c2hvcnQ%3D@h:1", "needs a 32-byte key"),
        ("ss://aes-128-gcm:pw@h:1/?plugin=obfs-local", "plugins are not supported"),
        ("ss://aes-128-gcm:pw@h:1/path", "unexpected path"),
    ],
)
def test_errors_name_the_problem(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        parse_outbound_url(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["ss://aes-128-gcm:secret\uff03@h:1", "ss://aes-128-gcm:secret@[h:1"]
)
def test_a_url_urllib_cannot_split_is_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="not a URL") as info:
        parse_outbound_url(url)
    assert "secret" not in str(info.value)
