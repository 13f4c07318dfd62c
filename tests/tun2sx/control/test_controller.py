"""The controller API over real loopback sockets, against a fake engine."""

from __future__ import annotations

import functools
import logging
import urllib.parse
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
import wsproto.events

from tests.support.controller import (
    FakeEngine,
    WebSocket,
    read_lines,
    request,
    start_controller,
)
from tests.support.tls import self_signed
from tun2sx.control.controller import (
    MAX_BODY,
    MAX_CONNECTIONS,
    MAX_HEAD,
    SEND_TIMEOUT,
    Controller,
    handle_client,
    parse_target,
)

AUTH = [("Authorization", "Bearer s3cret")]


async def serve(nursery: trio.Nursery, secret: str | None = None, **kw: object):
    engine = FakeEngine()
    controller = Controller(engine, secret=secret, **kw)  # type: ignore[arg-type]
    port = await start_controller(nursery, controller)
    return engine, controller, port


def test_targets_are_split_and_decoded() -> None:
    assert parse_target("/proxies/a%20b?url=x&timeout=5") == (
        "/proxies/a b",
        {"url": "x", "timeout": "5"},
    )


async def test_secret_is_required_as_bearer_token(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery, "s3cret")
    assert (await request(port, "GET", "/version")).status == 401
    wrong = [("Authorization", "Bearer nope")]
    assert (await request(port, "GET", "/version", headers=wrong)).status == 401
    # A query token is for WebSocket upgrades only, where browsers set no headers.
    assert (await request(port, "GET", "/version?token=s3cret")).status == 401
    ok = await request(port, "GET", "/version", headers=AUTH)
    assert ok.status == 200
    assert ok.json() == {"version": "0.1.0", "meta": True}
    # The page itself loads without it (it asks for the secret).
    page = await request(port, "GET", "/ui")
    assert page.status == 200 and b"/connections" in page.body


async def test_websocket_takes_the_token_in_the_query(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery, "s3cret")
    with pytest.raises(ConnectionRefusedError):
        await WebSocket.open(port, "/traffic")
    ws = await WebSocket.open(port, "/traffic?token=s3cret")
    assert await ws.receive_json() == {"up": 0, "down": 0}
    await ws.close()


async def test_without_secret_only_loopback_hosts_and_origins(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery)
    assert (await request(port, "GET", "/version", host="evil.example:9090")).status == 403
    ok = await request(port, "GET", "/version", host="localhost:9090")
    assert ok.status == 200
    page = [("Origin", "https://evil.example")]
    answer = await request(port, "GET", "/connections", headers=page)
    # Answered, but without CORS headers the browser hides it from the page.
    assert "access-control-allow-origin" not in answer.headers
    local = [("Origin", "http://127.0.0.1:8080")]
    answer = await request(port, "GET", "/connections", headers=local)
    assert answer.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"


async def test_without_secret_a_foreign_page_cannot_open_a_websocket(
    nursery: trio.Nursery,
) -> None:
    """CORS does not cover WebSockets: a page on any web site could otherwise
    open ws://127.0.0.1:PORT/connections (its Host is loopback) and read
    every host the machine talks to. Browsers always send Origin there."""
    engine, _, port = await serve(nursery)
    engine.add_flow("private.example.com")
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
        with pytest.raises(ConnectionRefusedError):
            await WebSocket.open(port, "/connections", headers=[("Origin", origin)])
    # A dashboard served from loopback, and a program that sends no Origin.
    for headers in ([("Origin", "http://127.0.0.1:8080")], [("Origin", "http://localhost")], []):
        ws = await WebSocket.open(port, "/connections", headers=headers)
        snapshot = await ws.receive_json()
        assert snapshot["connections"][0]["metadata"]["host"] == "private.example.com"
        await ws.close()
    # With a secret, the token is what protects, whatever the page.
    _, _, guarded = await serve(nursery, "s3cret")
    page = [("Origin", "https://dashboard.example")]
    ws = await WebSocket.open(guarded, "/traffic?token=s3cret", headers=page)
    assert await ws.receive_json() == {"up": 0, "down": 0}
    await ws.close()


async def test_cors_preflight_with_a_secret(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery, "s3cret")
    headers = [
        ("Origin", "https://dashboard.example"),
        ("Access-Control-Request-Method", "PATCH"),
        ("Access-Control-Request-Headers", "authorization, content-type"),
    ]
    answer = await request(port, "OPTIONS", "/configs", headers=headers, host="192.0.2.1:9090")
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "PATCH" in answer.headers["access-control-allow-methods"]
    assert "Authorization" in answer.headers["access-control-allow-headers"]


async def test_patch_configs_switches_mode_and_log_level(nursery: trio.Nursery) -> None:
    engine, _, port = await serve(nursery)
    assert (await request(port, "GET", "/configs")).json()["mode"] == "rule"
    assert (await request(port, "PATCH", "/configs", body={"mode": "direct"})).status == 204
    assert engine.override == "DIRECT"
    assert (await request(port, "GET", "/configs")).json()["mode"] == "direct"
    await request(port, "PUT", "/proxies/GLOBAL", body={"name": "proxy"})
    await request(port, "PATCH", "/configs", body={"mode": "global"})
    assert engine.override == "proxy"
    await request(port, "PATCH", "/configs", body={"mode": "rule"})
    assert engine.override is None
    logger = logging.getLogger("tun2sx")
    before = logger.level
    try:
        await request(port, "PATCH", "/configs", body={"log-level": "debug"})
        assert logger.level == logging.DEBUG
        assert (await request(port, "GET", "/configs")).json()["log-level"] == "debug"
    finally:
        logger.setLevel(before)
    bad = await request(port, "PATCH", "/configs", body={"mode": "fast"})
    assert bad.status == 400 and "mode" in bad.json()["message"]
    assert (await request(port, "PATCH", "/configs", body=[1])).status == 400


async def test_proxies_list_groups_and_select(nursery: trio.Nursery) -> None:
    engine, _, port = await serve(nursery)
    engine.group.history["DIRECT"] = [(1_700_000_000.0, 12)]
    engine.group.down.add("DIRECT")
    proxies = (await request(port, "GET", "/proxies")).json()["proxies"]
    # A member a group's health checks hold down shows as not alive.
    assert proxies["DIRECT"]["alive"] is False
    assert proxies["REJECT"]["alive"] is True
    assert proxies["DIRECT"]["type"] == "Direct"
    assert proxies["REJECT"]["type"] == "Reject"
    assert proxies["DIRECT"]["history"] == [{"time": "2023-11-14T22:13:20.000Z", "delay": 12}]
    group = proxies["proxy"]
    assert (group["type"], group["all"], group["now"]) == (
        "Selector",
        ["DIRECT", "REJECT"],
        "DIRECT",
    )
    assert proxies["GLOBAL"]["type"] == "Selector"
    answer = await request(port, "PUT", "/proxies/proxy", body={"name": "REJECT"})
    assert answer.status == 204
    assert (await request(port, "GET", "/proxies/proxy")).json()["now"] == "REJECT"
    unknown = await request(port, "PUT", "/proxies/proxy", body={"name": "nowhere"})
    assert unknown.status == 400 and "nowhere" in unknown.json()["message"]
    assert (await request(port, "PUT", "/proxies/DIRECT", body={"name": "x"})).status == 400
    assert (await request(port, "GET", "/proxies/missing")).status == 404


async def test_delay_of_reject_is_an_error(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery)
    answer = await request(port, "GET", "/proxies/REJECT/delay?url=http://a.test/&timeout=500")
    assert answer.status == 503
    bad = await request(port, "GET", "/proxies/DIRECT/delay?url=ftp://x&timeout=500")
    assert bad.status == 400


@pytest.mark.parametrize("timeout", ["0", "-5", "1e-300", "nan", "inf", "60001", "99999999999"])
async def test_a_delay_test_refuses_an_absurd_timeout_naming_the_range(
    nursery: trio.Nursery, timeout: str
) -> None:
    _, _, port = await serve(nursery)
    answer = await request(
        port, "GET", f"/proxies/DIRECT/delay?url=http://a.test/&timeout={timeout}"
    )
    assert answer.status == 400
    assert answer.json()["message"].startswith("timeout: ")
    assert "1 to 60000 ms" in answer.json()["message"]
    group = await request(port, "GET", f"/group/proxy/delay?url=http://a.test/&timeout={timeout}")
    assert group.status == 400 and "1 to 60000 ms" in group.json()["message"]


@pytest.mark.parametrize("interval", ["-5", "nan", "inf", "1e300", "3600001"])
async def test_a_connections_stream_refuses_an_absurd_interval(
    nursery: trio.Nursery, interval: str
) -> None:
    _, _, port = await serve(nursery)
    # Today's answer to an accepted interval is a stream that never ends.
    with trio.fail_after(10):
        answer = await request(port, "GET", f"/connections?interval={interval}")
    assert answer.status == 400
    assert answer.json()["message"] == "interval: 0 to 3600000 ms (below 100 counts as 100)"


async def test_rules_in_order_then_the_default(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery)
    rules = (await request(port, "GET", "/rules")).json()["rules"]
    assert rules == [
        {"type": "DomainSuffix", "payload": "example.com", "proxy": "proxy", "size": -1},
        {"type": "Match", "payload": "", "proxy": "DIRECT", "size": -1},
    ]
    # A list that ends with its own MATCH leaves the default unused: not shown.
    engine = FakeEngine(rules=("IP-CIDR,10.0.0.0/8,DIRECT", "MATCH,proxy"))
    port = await start_controller(nursery, Controller(engine))  # type: ignore[arg-type]
    rules = (await request(port, "GET", "/rules")).json()["rules"]
    assert [(r["type"], r["payload"], r["proxy"]) for r in rules] == [
        ("IPCIDR", "10.0.0.0/8", "DIRECT"),
        ("Match", "", "proxy"),
    ]


async def test_connections_and_closing_them(nursery: trio.Nursery) -> None:
    engine, _, port = await serve(nursery)
    first = engine.add_flow("www.example.com", 443, up=10, down=2000)
    engine.add_flow("192.0.2.7", 53)
    data = (await request(port, "GET", "/connections")).json()
    assert data["uploadTotal"] == 10 and data["downloadTotal"] == 2000
    by_host = {
        c["metadata"]["host"] or c["metadata"]["destinationIP"]: c for c in data["connections"]
    }
    c = by_host["www.example.com"]
    assert c["id"] == first.id
    assert c["metadata"]["sourceIP"] == "10.0.0.2" and c["metadata"]["sourcePort"] == "40000"
    assert c["metadata"]["destinationPort"] == "443"
    assert c["metadata"]["network"] == "tcp"
    assert c["start"] == "2023-11-14T22:13:20.250Z"
    assert c["chains"] == ["proxy"]
    assert (c["rule"], c["rulePayload"]) == ("DomainSuffix", "example.com")
    assert (by_host["192.0.2.7"]["rule"], by_host["192.0.2.7"]["rulePayload"]) == ("Match", "")
    assert (c["upload"], c["download"]) == (10, 2000)
    assert by_host["192.0.2.7"]["metadata"]["host"] == ""
    # Asked again (rows are kept between requests), the bytes are current.
    first.bytes_down += 500
    again = (await request(port, "GET", "/connections")).json()
    (c,) = [c for c in again["connections"] if c["id"] == first.id]
    assert (c["upload"], c["download"], c["metadata"]["host"]) == (10, 2500, "www.example.com")
    assert again["downloadTotal"] == 2500
    assert (await request(port, "DELETE", f"/connections/{first.id}")).status == 204
    assert engine.closed == [first.id]
    assert (await request(port, "DELETE", f"/connections/{first.id}")).status == 404
    assert (await request(port, "DELETE", "/connections")).status == 204
    assert not engine.flows


async def test_streams_over_chunked_http_and_websocket(nursery: trio.Nursery) -> None:
    engine, _, port = await serve(nursery)
    engine.add_flow("www.example.com")
    memory = await read_lines(port, "/memory", 1)
    assert memory[0]["inuse"] > 0 and memory[0]["oslimit"] == 0
    ws = await WebSocket.open(port, "/connections?interval=100")
    for _ in range(2):
        snapshot = await ws.receive_json()
        assert snapshot["connections"][0]["metadata"]["host"] == "www.example.com"
    await ws.close()
    chunked = await read_lines(port, "/connections?interval=100", 2)
    assert [len(s["connections"]) for s in chunked] == [1, 1]


async def test_traffic_counts_bytes_per_second(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    engine, _, port = await serve(nursery)
    info = engine.add_flow("www.example.com")

    async def move() -> None:
        await trio.sleep(0.5)
        info.bytes_up += 300
        info.bytes_down += 7000

    nursery.start_soon(move)
    lines = await read_lines(port, "/traffic", 2)
    assert lines == [{"up": 0, "down": 0}, {"up": 300, "down": 7000}]


async def test_logs_stream_by_level(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery)
    ws = await WebSocket.open(port, "/logs?level=warning")
    log = logging.getLogger("tun2sx.test")

    async def keep_logging() -> None:
        # The subscription starts once the upgrade is answered: log until
        # the stream has taken a line.
        while True:
            log.info("not shown")
            log.warning("shown %d", 1)
            await trio.sleep(0.01)

    async with trio.open_nursery() as logging_nursery:
        logging_nursery.start_soon(keep_logging)
        for _ in range(3):
            assert await ws.receive_json() == {"type": "warning", "payload": "shown 1"}
        logging_nursery.cancel_scope.cancel()
    await ws.close()
    ws = await WebSocket.open(port, "/logs?level=warning&format=structured")
    async with trio.open_nursery() as logging_nursery:
        logging_nursery.start_soon(keep_logging)
        entry = await ws.receive_json()
        logging_nursery.cancel_scope.cancel()
    assert (entry["level"], entry["message"], entry["fields"]) == ("warning", "shown 1", [])
    assert entry["time"].endswith("Z")
    await ws.close()
    bad = await request(port, "GET", "/logs?level=loud")
    assert bad.status == 400


async def test_reload_hook(nursery: trio.Nursery) -> None:
    seen: list[str | None] = []

    def reload(path: str | None) -> str | None:
        seen.append(path)
        return None if path != "/bad.toml" else "rules[0] 'X': unknown rule type"

    _, _, port = await serve(nursery, reload=reload)
    put = await request(port, "PUT", "/configs?force=true", body={"path": "/etc/t.toml"})
    assert put.status == 204
    bad = await request(port, "PUT", "/configs?force=true", body={"path": "/bad.toml"})
    assert bad.status == 400 and bad.json()["message"].startswith("rules[0]")
    assert (await request(port, "PUT", "/configs", body={})).status == 204
    assert seen == ["/etc/t.toml", "/bad.toml", None]


async def test_bad_requests_get_400_and_the_server_goes_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, port = await serve(nursery)
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(junk)
            answer = b""
            while data := await stream.receive_some():
                answer += data
        assert answer.startswith(b"HTTP/1.1 400 ")
    big = await request(port, "PATCH", "/configs", body={"mode": "x" * MAX_BODY})
    assert big.status == 413
    assert (await request(port, "GET", "/nothing")).status == 404
    assert (await request(port, "POST", "/version")).status == 405
    assert (await request(port, "GET", "/version")).status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_a_deeply_nested_json_body_is_400_without_a_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, port = await serve(nursery)
    body = b"[" * 5000 + b"]" * 5000  # deeper than Python's recursion limit
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"PATCH /configs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        answer = b""
        while data := await stream.receive_some():
            answer += data
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_unsplittable_targets_and_origins_are_answered_without_a_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, port = await serve(nursery)
    assert (await request(port, "GET", "//[x/version")).status == 400
    broken_origin = [("Origin", "http://[")]
    answer = await request(port, "GET", "/version", headers=broken_origin)
    # Answered like a foreign page: without CORS headers.
    assert answer.status == 200 and "access-control-allow-origin" not in answer.headers
    assert (await request(port, "GET", "/version")).status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_request_heads_are_bounded(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /version HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 100))
        answer = b""
        with trio.fail_after(10):
            while data := await stream.receive_some():
                answer += data
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


async def test_a_client_that_sends_nothing_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    _, _, port = await serve(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /ver")
        with trio.fail_after(60):
            assert await stream.receive_some() == b""


async def test_streams_whose_clients_left_free_their_slots(nursery: trio.Nursery) -> None:
    _, _, port = await serve(nursery)
    # More quiet streams than the server takes at once, one after another:
    # each client leaves, and the server must notice though it has nothing
    # to send (no log lines come).
    for _ in range(MAX_CONNECTIONS + 8):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /logs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some()
        assert head.startswith(b"HTTP/1.1 200 ")
        await stream.aclose()
    with trio.fail_after(10):
        assert (await request(port, "GET", "/version")).status == 200


async def test_a_websocket_client_that_stops_reading_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    engine, _, port = await serve(nursery)
    for i in range(300):
        engine.add_flow(f"host{i}.example.com")
    ws = await WebSocket.open(port, "/connections?interval=100")
    # Read nothing for a while: the kernel's buffers fill, the server's
    # write stalls past SEND_TIMEOUT and it gives the client up.
    await trio.sleep(SEND_TIMEOUT * 3)
    received = 0
    with trio.fail_after(SEND_TIMEOUT):
        while data := await ws.stream.receive_some(1 << 20):
            received += len(data)
    assert received > 0
    await ws.stream.aclose()


async def test_a_failing_hook_is_logged_and_the_server_goes_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def reload(path: str | None) -> str | None:
        raise RuntimeError("bug in the hook")

    _, _, port = await serve(nursery, reload=reload)
    failed = await request(port, "PUT", "/configs", body={})
    assert failed.status == 500 and failed.json() == {"message": "internal error (logged)"}
    assert (await request(port, "GET", "/version")).status == 200
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1 and "request failed" in failures[0].getMessage()


async def test_a_flows_own_rule_is_shown_as_clash_names_it(nursery: trio.Nursery) -> None:
    engine, _, port = await serve(nursery)
    info = engine.add_flow("www.example.com")
    # What routing records, in the config's spelling (FlowInfo.rule).
    info.rule, info.rule_payload, info.chain = "IP-CIDR", "10.0.0.0/8", ("a", "g")
    info.sniffed, info.host_source = "www.example.com", "sniffed"
    (row,) = (await request(port, "GET", "/connections")).json()["connections"]
    assert (row["rule"], row["rulePayload"], row["chains"]) == ("IPCIDR", "10.0.0.0/8", ["a", "g"])
    assert row["metadata"]["sniffHost"] == "www.example.com"
    assert row["metadata"]["hostSource"] == "sniffed"


async def exchange(controller: Controller, chunks: list[bytes]) -> bytes:
    """Send `chunks` to one connection's handler over a memory stream pair,
    half-close, and return all it answered."""
    client, server = trio.testing.memory_stream_pair()
    answer = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_client, server, controller.answer, controller.access.cors_headers)
        for chunk in chunks:
            await client.send_all(chunk)
        await client.send_eof()
        while data := await client.receive_some():
            answer += data
    return answer


async def test_a_request_sent_byte_by_byte_is_answered() -> None:
    body = b'{"mode": "global"}'
    head = b"PATCH /configs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
    request_bytes = head % len(body) + body
    engine = FakeEngine()
    controller = Controller(engine)  # type: ignore[arg-type]
    answer = await exchange(controller, [bytes([b]) for b in request_bytes])
    assert answer.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert controller.state.mode == "global"


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(junk=st.binary(max_size=300), cut=st.integers(0, 300))
def test_any_bytes_get_an_http_answer_or_none(junk: bytes, cut: int) -> None:
    controller = Controller(FakeEngine())  # type: ignore[arg-type]
    prefixed = [b"GET /version HTTP/1.1\r\n"[:cut], junk] if cut % 2 else [junk]
    answer = trio.run(exchange, controller, prefixed)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")


async def test_a_websocket_ping_while_a_message_is_being_written_is_answered(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A dashboard pings (or says goodbye) while the server is in the middle
    of writing a large snapshot: the pong waits its turn instead of failing
    the connection with a traceback."""
    engine, _, port = await serve(nursery)
    for i in range(2000):
        engine.add_flow(f"host{i}.example.com")
    ws = await WebSocket.open(port, "/connections?interval=100")
    # Not reading: the first snapshot's write stalls on full buffers.
    await trio.sleep(0.5)
    for _ in range(3):
        await ws.stream.send_all(ws.ws.send(wsproto.events.Ping(payload=b"hi")))
    await trio.sleep(0.5)
    pongs = 0
    with trio.fail_after(10):
        while pongs == 0:
            event = await ws._next()
            pongs += isinstance(event, wsproto.events.Pong)
    await ws.close()
    with trio.fail_after(10):
        assert (await request(port, "GET", "/version")).status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_delay_of_an_https_url_as_dashboards_send_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Every dashboard's default test URL is https://www.gstatic.com/generate_204:
    it is timed over TLS, not refused."""
    _, _, port = await serve(nursery)

    async def server(stream: trio.SSLStream[trio.SocketStream]) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        await trio.aclose_forcefully(stream)

    (listener,) = await nursery.start(
        functools.partial(
            trio.serve_ssl_over_tcp, server, 0, self_signed(tmp_path), host="127.0.0.1"
        )
    )
    tls_port = listener.transport_listener.socket.getsockname()[1]
    url = urllib.parse.quote(f"https://127.0.0.1:{tls_port}/generate_204", safe="")
    answer = await request(port, "GET", f"/proxies/DIRECT/delay?url={url}&timeout=5000")
    assert answer.status == 200 and answer.json()["delay"] >= 1
    group = await request(port, "GET", f"/group/proxy/delay?url={url}&timeout=5000")
    assert group.status == 200 and group.json()["DIRECT"] >= 1
