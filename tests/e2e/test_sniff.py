"""Sniffing end to end: names read from TLS, HTTP and QUIC route real addresses.

The client connects to a literal address (curl `--resolve`), so tun2sx's
DNS never sees a name: 10.200.1.1, an address of the server namespace that
the client reaches only through the TUN. The server namespace runs nginx
on 80 and 443 there (a self-signed certificate), a SOCKS5 server that logs
the host of each CONNECT (`rec`, beside Dante), a server that speaks first
on 22 and 8443, and a UDP server on 443 that logs each datagram's QUIC
connection ID. Which outbound carried a flow shows in `rec`'s log; a UDP
flow rejected by rule gets an ICMP error and never reaches the server.
The same is asked of an IPv6 literal address (TARGET6).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import ROOT, SERVER_ADDR, WHOAMI_NAMES, Testbed, running_bed
from tests.support import require
from tests.support.tls import write_self_signed

pytestmark = pytest.mark.e2e

TARGET = WHOAMI_NAMES["n1.test"]  # on the server's loopback: routed through the TUN
# Another of the server's addresses, where no UDP server listens.
ELSEWHERE = WHOAMI_NAMES["n2.test"]
# An IPv6 address the client reaches only through the TUN (its default
# route). No server has it: the proxy `rec` relays every CONNECT to TARGET,
# so what `rec` logs shows what tun2sx asked for, and nginx what was sent.
TARGET6 = "fd00:201::1"
REC_PORT = 1090
STATS_PORT = 9090
SNIFF_TIMEOUT = 3.0
CONFIG = f"""\
rules = [
  "DOMAIN-SUFFIX,rec.test,rec",
  "DOMAIN,blocked.test,REJECT",
  "MATCH,dante",
]
[outbounds.dante]
url = "socks5://{SERVER_ADDR}:1081"
[outbounds.rec]
url = "socks5://{SERVER_ADDR}:{REC_PORT}"
[stats]
listen = "127.0.0.1:{STATS_PORT}"
[sniff]
timeout = {SNIFF_TIMEOUT}
"""
NGINX_CONF = """\
daemon off; master_process off; worker_processes 1; pid {tmp}/sniff-nginx.pid;
error_log stderr;
events {{ worker_connections 64; }}
http {{
    log_format who '$host';
    access_log {tmp}/nginx-access.log who;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{
        listen {addr}:80;
        listen {addr}:443 ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        location / {{ return 200 "sniff $host\\n"; }}
    }}
}}
"""


def write_certificate(tmp: Path) -> None:
    """A self-signed certificate for *.test (curl runs with -k)."""
    write_self_signed(tmp, "sniff.test", names=("*.test",), days=30)


class SniffLab:
    """The testbed with the sniffing peers and tun2sx on the rules above."""

    def __init__(self, testbed: Testbed) -> None:
        self.testbed = testbed
        tmp = testbed.tmp
        write_certificate(tmp)
        (tmp / "sniff-nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, addr=TARGET))
        self.access_log = tmp / "nginx-access.log"
        self.rec_log = tmp / "rec.log"
        self.udp_log = tmp / "udp.log"
        server = testbed.server
        server.spawn(["nginx", "-c", str(tmp / "sniff-nginx.conf")])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        peer = [sys.executable, "-m", "tests.e2e.sniffpeers"]
        where = ["--bind", TARGET, "--port"]
        rec_argv = [*peer, "socks", "--bind", SERVER_ADDR, "--port", str(REC_PORT), "--to", TARGET]
        with self.rec_log.open("wb") as rec, self.udp_log.open("wb") as udp:
            server.spawn(rec_argv, env=env, stdout=rec)
            server.spawn([*peer, "udp", *where, "443"], env=env, stdout=udp)
        for port in (22, 8443):
            server.spawn([*peer, "banner", *where, str(port)], env=env)
        for port in (80, 443, REC_PORT, 22, 8443):
            server.wait_listening(port)
        server.wait_listening(443, udp=True)
        self.config = tmp / "sniff.toml"
        self.config.write_text(CONFIG)
        self.mode = ""

    def restart(self, mode: str, *, fake_ip: bool = False) -> None:
        key = f"{mode} fake_ip" if fake_ip else mode
        if key == self.mode:
            return
        self.config.write_text(CONFIG + ("fake_ip = true\n" if fake_ip else ""))
        self.testbed.stop()
        self.testbed.proxy_args = ["--config", str(self.config)]
        self.testbed.start("--sniff", mode)
        self.mode = key

    def curl(self, url: str, name: str, port: int, address: str = TARGET) -> tuple[int, str]:
        """curl `url` with `name` resolved to a literal address (the server's by default)."""
        where = f"[{address}]" if ":" in address else address
        result = self.testbed.client_run(
            ["curl", "-sSk", "--max-time", "20", "--resolve", f"{name}:{port}:{where}", url],
            check=False,
        )
        return result.returncode, result.stdout

    def peer(self, *args: object) -> dict[str, object]:
        result = self.testbed.client_run(
            [sys.executable, "-m", "tests.e2e.sniffpeers", *map(str, args)], timeout=60
        )
        return json.loads(result.stdout)  # type: ignore[no-any-return]


def lines_of(path: Path, count: int, timeout: float = 10) -> list[str]:
    """The first `count` lines of a log a server writes after answering."""
    deadline = time.monotonic() + timeout
    while len(lines := path.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, f"{path.name}: {lines!r}, want {count} lines"
        time.sleep(0.05)
    return lines


@pytest.fixture(scope="module")
def lab() -> Iterator[SniffLab]:
    require("microsocks", "danted", "curl", "nginx")
    with running_bed("t2sx-sniff", Testbed) as bed:
        yield SniffLab(bed)


def connects(lab: SniffLab, before: int, count: int) -> list[tuple[str, int]]:
    """(host, port) of `rec`'s CONNECTs after the first `before`, `count` of them."""
    lines = lines_of(lab.rec_log, before + count)[before:]
    return [(entry["host"], entry["port"]) for entry in map(json.loads, lines)]


def rec_count(lab: SniffLab) -> int:
    return len(lab.rec_log.read_text().splitlines())


def test_tls_sni_of_a_literal_address_meets_domain_rules(lab: SniffLab) -> None:
    lab.restart("route")
    before = rec_count(lab)
    # Through Dante (MATCH): the name is no rec.test, or there is none at
    # all (curl sends no SNI for an address).
    assert lab.curl("https://www.other.test/", "www.other.test", 443) == (
        0,
        "sniff www.other.test\n",
    )
    assert lab.curl(f"https://{TARGET}/", "unused.test", 443) == (0, f"sniff {TARGET}\n")
    # Through rec by the sniffed name; in route mode rec gets the address.
    assert lab.curl("https://www.rec.test/", "www.rec.test", 443) == (0, "sniff www.rec.test\n")
    assert connects(lab, before, 1) == [(TARGET, 443)]
    assert rec_count(lab) == before + 1


def test_http_host_meets_domain_rules(lab: SniffLab) -> None:
    lab.restart("route")
    before = rec_count(lab)
    assert lab.curl("http://app.other.test/", "app.other.test", 80) == (0, "sniff app.other.test\n")
    assert lab.curl("http://app.rec.test/x", "app.rec.test", 80) == (0, "sniff app.rec.test\n")
    assert connects(lab, before, 1) == [(TARGET, 80)]
    assert rec_count(lab) == before + 1


def test_a_sniffed_name_rejected_by_rule_is_reset(lab: SniffLab) -> None:
    lab.restart("route")
    before = lab.access_log.read_text()
    code, _ = lab.curl("https://blocked.test/", "blocked.test", 443)
    assert code in (35, 56)  # TLS connect error / receive failure: the reset
    assert "(blocked.test): rejected by rule; reset" in lab.testbed.log()
    assert lab.access_log.read_text() == before


def test_override_hands_the_name_to_the_proxy(lab: SniffLab) -> None:
    lab.restart("override")
    before = rec_count(lab)
    assert lab.curl("https://www.rec.test/", "www.rec.test", 443)[1] == "sniff www.rec.test\n"
    assert lab.curl("http://www.rec.test/", "www.rec.test", 80)[1] == "sniff www.rec.test\n"
    assert connects(lab, before, 2) == [("www.rec.test", 443), ("www.rec.test", 80)]


def test_a_server_that_speaks_first_is_not_stalled(lab: SniffLab) -> None:
    lab.restart("route")
    # Port 22 is no sniffing port: the banner comes as soon as the proxy connects.
    answer = lab.peer("first-byte", TARGET, 22)
    assert str(answer["data"]).startswith("SSH-2.0-")
    assert float(answer["seconds"]) < SNIFF_TIMEOUT - 1  # type: ignore[arg-type]
    # On a sniffing port (8443, TLS) silence ends the wait after the time-out,
    # and the flow goes on by its address.
    answer = lab.peer("first-byte", TARGET, 8443)
    assert str(answer["data"]).startswith("SSH-2.0-")
    assert SNIFF_TIMEOUT <= float(answer["seconds"]) < SNIFF_TIMEOUT + 5  # type: ignore[arg-type]


def test_quic_initial_sni_routes_udp(lab: SniffLab) -> None:
    lab.restart("route")
    before = len(lab.udp_log.read_text().splitlines())
    blocked = lab.peer("quic", TARGET, 443, "blocked.test")
    # REJECT by the name in the ClientHello: ICMP administratively
    # prohibited, which a connected UDP socket reports as EHOSTUNREACH.
    assert (blocked["sent"], blocked["outcome"]) == (3, "EHOSTUNREACH")
    allowed = lab.peer("quic", TARGET, 443, "video.other.test")
    assert (allowed["sent"], allowed["outcome"]) == (3, "no answer")
    seen = [json.loads(line) for line in lines_of(lab.udp_log, before + 3)[before:]]
    assert [entry["dcid"] for entry in seen] == [allowed["dcid"]] * 3
    assert {entry["source"] for entry in seen} == {SERVER_ADDR}  # through Dante
    assert blocked["dcid"] not in lab.udp_log.read_text()


def test_the_connections_view_shows_the_sniffed_name(lab: SniffLab) -> None:
    lab.restart("route")
    # A QUIC session (idle for 60 s before it ends) and a TLS flow held open.
    assert lab.peer("quic", TARGET, 443, "view.other.test")["sent"] == 3
    answer = lab.peer("hold-tls", TARGET, 443, "held.rec.test", STATS_PORT)
    listing = answer["connections"]
    assert isinstance(listing, dict)
    connections = [c for c in listing["connections"] if c["metadata"]["destinationIP"] == TARGET]
    flows = [c for c in connections if c["metadata"]["network"] == "tcp"]
    assert len(flows) == 1, answer
    (flow,) = flows
    assert flow["metadata"]["destinationPort"] == "443"
    meta = flow["metadata"]
    # `host` is the sniffed name (no fake IP stood for one); the chain is
    # the outbound the sniffed name's rule chose.
    assert (meta["host"], meta["sniffHost"], meta["hostSource"], flow["chains"]) == (
        "held.rec.test",
        "held.rec.test",
        "sniffed",
        ["rec"],
    )
    sessions = [c for c in connections if c["metadata"]["sniffHost"] == "view.other.test"]
    assert [
        (s["metadata"]["network"], s["metadata"]["hostSource"], s["chains"]) for s in sessions
    ] == [("udp", "sniffed", ["dante"])]


def test_quic_override_sends_the_sniffed_name_to_the_proxy(lab: SniffLab) -> None:
    # The application sends to ELSEWHERE, where nothing takes UDP; the
    # ClientHello names n1.test, which the server namespace's hosts file
    # maps to TARGET. Override hands Dante the name (a UDP ASSOCIATE
    # datagram for a host name), so the datagrams reach TARGET's server.
    lab.restart("override")
    before = len(lab.udp_log.read_text().splitlines())
    sent = lab.peer("quic", ELSEWHERE, 443, "n1.test")
    assert sent["sent"] == 3
    seen = [json.loads(line) for line in lines_of(lab.udp_log, before + 3)[before:]]
    assert [(entry["dcid"], entry["source"]) for entry in seen] == [(sent["dcid"], SERVER_ADDR)] * 3
    # In route mode the same datagrams go where the application sent them.
    lab.restart("route")
    before = len(lab.udp_log.read_text().splitlines())
    lost = lab.peer("quic", ELSEWHERE, 443, "n1.test")
    assert lost["sent"] == 3
    # Then to TARGET itself: its three are the first the server hears of.
    reached = lab.peer("quic", TARGET, 443, "n1.test")
    seen = [json.loads(line)["dcid"] for line in lines_of(lab.udp_log, before + 3)[before:]]
    assert seen == [reached["dcid"]] * 3
    assert str(lost["dcid"]) not in lab.udp_log.read_text()


def test_tls_and_http_to_an_ipv6_address_meet_domain_rules(lab: SniffLab) -> None:
    lab.restart("route")
    before = rec_count(lab)
    assert lab.curl("https://www.rec.test/", "www.rec.test", 443, TARGET6) == (
        0,
        "sniff www.rec.test\n",
    )
    assert lab.curl("http://app.rec.test/", "app.rec.test", 80, TARGET6) == (
        0,
        "sniff app.rec.test\n",
    )
    assert connects(lab, before, 2) == [(TARGET6, 443), (TARGET6, 80)]
    code, _ = lab.curl("https://blocked.test/", "blocked.test", 443, TARGET6)
    assert code in (35, 56)
    assert rec_count(lab) == before + 2
    lab.restart("override")
    before = rec_count(lab)
    assert lab.curl("https://v6.rec.test/", "v6.rec.test", 443, TARGET6)[1] == "sniff v6.rec.test\n"
    assert connects(lab, before, 1) == [("v6.rec.test", 443)]


def test_quic_to_an_ipv6_address_is_routed_by_its_sni(lab: SniffLab) -> None:
    lab.restart("route")
    # REJECT by the name: ICMPv6 administratively prohibited, which Linux
    # reports on a connected UDP socket as EACCES.
    blocked = lab.peer("quic", TARGET6, 443, "blocked.test")
    assert (blocked["sent"], blocked["outcome"]) == (3, "EACCES")
    answer = lab.peer("hold-tls", TARGET6, 443, "held6.rec.test", STATS_PORT)
    listing = answer["connections"]
    assert isinstance(listing, dict)
    (flow,) = [c for c in listing["connections"] if c["metadata"]["sniffHost"] == "held6.rec.test"]
    meta = flow["metadata"]
    assert (meta["network"], meta["destinationIP"], meta["hostSource"], flow["chains"]) == (
        "tcp",
        TARGET6,
        "sniffed",
        ["rec"],
    )


@pytest.mark.parametrize("fake_ip", [False, True])
def test_a_fake_ip_flow_is_sniffed_only_when_asked(lab: SniffLab, fake_ip: bool) -> None:
    # curl resolves n1.test through tun2sx (a fake IP) but sends the SNI
    # www.rec.test: by default the name the application resolved decides
    # (MATCH, Dante); with `fake_ip = true` the sniffed one does (rec), and
    # in route mode the proxy still gets the resolved name.
    lab.restart("route", fake_ip=fake_ip)
    before = rec_count(lab)
    result = lab.testbed.client_run(
        [
            "curl",
            "-sSk",
            "--max-time",
            "20",
            "--connect-to",
            "www.rec.test:443:n1.test:443",
            "https://www.rec.test/",
        ],
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "sniff www.rec.test\n")
    if fake_ip:
        assert connects(lab, before, 1) == [("n1.test", 443)]
    assert rec_count(lab) == before + fake_ip


def test_quic_v2_initial_sni_routes_udp(lab: SniffLab) -> None:
    lab.restart("route")
    # RFC 9369's version, whose Initials use a salt and labels of their own.
    blocked = lab.peer("quic", TARGET, 443, "blocked.test", "--version", "0x6b3343cf")
    assert (blocked["sent"], blocked["outcome"]) == (3, "EHOSTUNREACH")
    before = len(lab.udp_log.read_text().splitlines())
    allowed = lab.peer("quic", TARGET, 443, "v2.other.test", "--version", "0x6b3343cf")
    seen = [json.loads(line)["dcid"] for line in lines_of(lab.udp_log, before + 3)[before:]]
    assert seen == [allowed["dcid"]] * 3
