"""The controller on a real run: flows through the TUN listed, closed with
a reset, counted in /metrics, and the /ui page in headless Chromium."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.browser import CHROMIUM_FLAGS, Waiter, chromium_in
from tests.e2e.testbed import DANTE_PORT, SERVER_ADDR, Testbed
from tests.support import in_ci

PORT = 19190
SECRET = "e2e-s3cret"
CONFIG = f"""\
outbound = "proxy"
rules = ["DOMAIN-SUFFIX,echo.test,proxy", "DOMAIN,www.test,DIRECT"]

[outbounds.proxy]
url = "socks5://{SERVER_ADDR}:{DANTE_PORT}"

[stats]
listen = "127.0.0.1:{PORT}"
secret = "{SECRET}"
"""


@pytest.fixture(scope="module")
def controlled(testbed: Testbed) -> Iterator[Testbed]:
    """The module's testbed with rules, a named outbound (Dante, which
    relays UDP too) and the controller."""
    config = testbed.tmp / "controller.toml"
    config.write_text(CONFIG)
    testbed.stop()
    saved = testbed.proxy_args
    testbed.proxy_args = ["--config", str(config)]
    testbed.start()
    deadline = time.monotonic() + 10
    while get(testbed, "/version", check=False).get("version") is None:
        assert time.monotonic() < deadline, "the controller did not answer"
        time.sleep(0.1)
    yield testbed
    testbed.stop()
    testbed.proxy_args = saved
    testbed.start()


def curl(bed: Testbed, *args: str, check: bool = True) -> str:
    argv = ["curl", "-s", "--max-time", "10", "-H", f"Authorization: Bearer {SECRET}", *args]
    return bed.client_run(argv, check=check).stdout


def get(bed: Testbed, path: str, *, check: bool = True) -> Any:
    text = curl(bed, f"http://127.0.0.1:{PORT}{path}", check=check)
    try:
        return json.loads(text)
    except ValueError:
        if check:
            raise
        return {}


def flow_of(bed: Testbed, source_port: int) -> dict[str, Any]:
    for row in get(bed, "/connections")["connections"]:
        if row["metadata"]["sourcePort"] == str(source_port):
            return dict(row)
    raise AssertionError(f"no connection from port {source_port}")


def test_a_live_flow_is_listed_and_closing_it_resets_the_application(
    controlled: Testbed,
) -> None:
    waiter = Waiter(controlled, "echo.test", 7001)
    row = flow_of(controlled, waiter.ready["port"])
    meta = row["metadata"]
    assert (meta["network"], meta["host"], meta["destinationPort"]) == ("tcp", "echo.test", "7001")
    assert meta["dnsMode"] == "fake-ip"
    assert (row["rule"], row["rulePayload"]) == ("DomainSuffix", "echo.test")
    assert row["chains"] == ["proxy"]
    assert row["upload"] == 4 and row["download"] == 4
    curl(controlled, "-X", "DELETE", f"http://127.0.0.1:{PORT}/connections/{row['id']}")
    assert waiter.ended() == "ECONNRESET"
    ids = [c["id"] for c in get(controlled, "/connections")["connections"]]
    assert row["id"] not in ids


def test_closing_a_udp_session_ends_it(controlled: Testbed) -> None:
    assert controlled.client_tool("udp", "echo.test", 7001, 3)["echoed"] == 3
    sessions = [
        c
        for c in get(controlled, "/connections")["connections"]
        if c["metadata"]["network"] == "udp" and c["metadata"]["host"] == "echo.test"
    ]
    assert sessions and all(c["upload"] > 0 and c["download"] > 0 for c in sessions)
    for session in sessions:
        url = f"http://127.0.0.1:{PORT}/connections/{session['id']}"
        assert curl(controlled, "-X", "DELETE", "-w", "%{http_code}", url) == "204"
    deadline = time.monotonic() + 5
    while True:
        live = {c["id"] for c in get(controlled, "/connections")["connections"]}
        if not live & {c["id"] for c in sessions}:
            break
        assert time.monotonic() < deadline, "the sessions are still listed"
        time.sleep(0.1)
    # The next datagrams start a session of their own.
    assert controlled.client_tool("udp", "echo.test", 7001, 3)["echoed"] == 3


def test_metrics_count_real_flows_and_connect_times(controlled: Testbed) -> None:
    result = controlled.client_tool("echo", "echo.test", 7001, 1000)
    assert result["equal"]
    text = curl(controlled, f"http://127.0.0.1:{PORT}/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("tun2sx_tcp_flows_total", ())] >= 1
    assert samples[("tun2sx_bytes_total", (("direction", "up"),))] >= 1000
    assert samples[("tun2sx_outbound_connect_seconds_count", (("outbound", "proxy"),))] >= 1
    assert samples[("tun2sx_dns_answers_total", (("kind", "fake"),))] >= 1
    assert samples[("tun2sx_fake_ip_mappings", (("family", "ipv4"),))] >= 1
    assert samples[("tun2sx_resident_memory_bytes", ())] > 10_000_000


def test_mode_global_takes_new_flows_past_the_rules(controlled: Testbed) -> None:
    """www.test's rule says DIRECT (which cannot reach it from here); in
    global mode it goes to GLOBAL's choice, the proxy, and connects."""
    url = f"http://127.0.0.1:{PORT}/configs"
    assert (
        curl(controlled, "-X", "PUT", "-d", '{"name": "proxy"}', f"{url[:-8]}/proxies/GLOBAL") == ""
    )
    curl(controlled, "-X", "PATCH", "-d", '{"mode": "global"}', url)
    try:
        waiter = Waiter(controlled, "www.test", 7001)
        row = flow_of(controlled, waiter.ready["port"])
        assert row["metadata"]["host"] == "www.test"
        assert row["chains"] == ["proxy"]
        curl(controlled, "-X", "DELETE", f"http://127.0.0.1:{PORT}/connections")
        assert waiter.ended() == "ECONNRESET"
    finally:
        curl(controlled, "-X", "PATCH", "-d", '{"mode": "rule"}', url)
    assert get(controlled, "/configs")["mode"] == "rule"


def test_the_ui_lists_a_live_flow_and_closes_it(controlled: Testbed, tmp_path: Path) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci():
            raise
        pytest.skip("playwright is not installed")
    executable = chromium_in(controlled, tmp_path)
    waiter = Waiter(controlled, "echo.test", 7001)
    port = waiter.ready["port"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(f"http://127.0.0.1:{PORT}/ui#secret={SECRET}")
            row = page.locator("#connections tr", has_text=f":{port}")
            row.wait_for(timeout=15000)
            assert row.locator("td.host").inner_text() == "echo.test:7001"
            assert row.locator("td.rule").inner_text() == "DomainSuffix echo.test"
            assert row.locator("td.chain").inner_text() == "proxy"
            group = page.locator("select[data-group=GLOBAL]")
            assert group.input_value() == "proxy"
            # Choosing in the page selects through the API.
            group.select_option("DIRECT")
            deadline = time.monotonic() + 5
            while get(controlled, "/proxies/GLOBAL")["now"] != "DIRECT":
                assert time.monotonic() < deadline, "the page's choice did not arrive"
                time.sleep(0.1)
            group.select_option("proxy")
            page.wait_for_function("document.getElementById('rate').textContent !== ''")
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            row.locator("button.close").click()
            assert waiter.ended() == "ECONNRESET"
            row.wait_for(state="detached", timeout=5000)
        finally:
            browser.close()


DASHBOARD = """<!doctype html><script>
(async () => {
  const auth = {headers: {Authorization: "Bearer SECRET"}};
  try {
    const version = await (await fetch("http://127.0.0.1:PORT/version", auth)).json();
    const patched = await fetch("http://127.0.0.1:PORT/configs", {
      method: "PATCH", body: JSON.stringify({"log-level": "info"}),
      headers: {Authorization: "Bearer SECRET", "Content-Type": "application/json"},
    });
    const bare = await fetch("http://127.0.0.1:PORT/version");
    document.title = [version.version, patched.status, bare.status].join(" ");
  } catch (e) {
    document.title = "failed: " + e;
  }
})();
</script>"""


def test_a_dashboard_from_another_origin_is_allowed_with_the_secret(
    controlled: Testbed, tmp_path: Path
) -> None:
    """A page served elsewhere (another port: another origin) calls the API
    with the secret, a PATCH with its preflight included."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci():
            raise
        pytest.skip("playwright is not installed")
    site = tmp_path / "site"
    site.mkdir()
    page_text = DASHBOARD.replace("SECRET", SECRET).replace("PORT", str(PORT))
    (site / "dash.html").write_text(page_text)
    server = controlled.client.spawn(
        [
            sys.executable,
            "-m",
            "http.server",
            "19191",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(site),
        ]
    )
    try:
        controlled.client.wait_listening(19191)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium_in(controlled, tmp_path), args=CHROMIUM_FLAGS
            )
            try:
                page = browser.new_page()
                page.goto("http://127.0.0.1:19191/dash.html")
                page.wait_for_function("document.title !== ''", timeout=15000)
                # The version, the PATCH's 204 and, without the secret, 401.
                assert page.title() == "0.1.0 204 401"
            finally:
                browser.close()
    finally:
        controlled.lab.stop(server)
