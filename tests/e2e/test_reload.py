"""SIGHUP under traffic: open flows lose no byte, the next flow meets the new rules.

tun2sx runs from a config file; two transfers stop halfway, the file
changes so that their own ports are now rejected, SIGHUP reloads it, and
both transfers finish with every byte (a SHA-256 end to end) while new
connections meet the new rules. A bad file is refused with one line and
changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import ROOT, SERVER_ADDR, WHOAMI_PORT, Testbed, running_bed
from tests.support import require
from tun2sx.lab.netns import Lab

pytestmark = pytest.mark.e2e

SIZE = 16 * 1024 * 1024
CONFIG = """\
outbound = "{default}"
rules = [{rules}]
[outbounds.micro]
url = "socks5://{server}:1080"
[outbounds.dante]
url = "socks5://{server}:1081"
{extra}"""


def _config(path: Path, default: str, *rules: str, extra: str = "") -> None:
    text = CONFIG.format(
        default=default, rules=", ".join(map(json.dumps, rules)), server=SERVER_ADDR, extra=extra
    )
    # Written whole and renamed into place, as an editor saves: a reload
    # still reading the file never sees half of it.
    part = path.with_suffix(".part")
    part.write_text(text)
    part.replace(path)


@pytest.fixture(scope="module")
def bed(testbed: Testbed) -> Iterator[Testbed]:
    """The module's testbed with tun2sx started from a config file."""
    config = testbed.tmp / "reload.toml"
    # Dante first: the held upload half-closes, which microsocks does not carry.
    _config(config, "dante")
    testbed.stop()
    testbed.proxy_args = ["--config", str(config)]
    testbed.start()
    yield testbed


class _Held:
    """A client transfer that stops halfway until told to go on."""

    def __init__(self, bed: Testbed, kind: str, host: str, port: int) -> None:
        argv = [sys.executable, "-m", "tests.e2e.client", kind, host, str(port), str(SIZE)]
        self.proc = subprocess.Popen(
            bed.client.exec_argv(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=str(ROOT),
        )

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the client said nothing in time"
        return self.proc.stdout.readline().decode().strip()

    def wait_halfway(self) -> None:
        line = self._line(60)
        assert line == "half", line

    def finish(self) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        result: dict[str, object] = json.loads(self._line(90))
        self.proc.wait(10)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _hup_and_wait(bed: Testbed, words: str, times: int = 1) -> str:
    """SIGHUP tun2sx; the log it wrote until `times` lines with `words` appeared."""
    assert bed.proc is not None
    offset = bed.log_path.stat().st_size
    bed.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with bed.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if text.count(words) >= times:
            return text
        time.sleep(0.05)
    raise AssertionError(f"no {words!r} in the log after SIGHUP")


def _whoami(bed: Testbed, name: str) -> dict[str, object]:
    return bed.client_tool("connect", name, WHOAMI_PORT, timeout=30)


def test_a_reload_under_traffic_loses_no_byte_and_applies_to_the_next_flow(bed: Testbed) -> None:
    config = bed.tmp / "reload.toml"
    held = [
        _Held(bed, "held-upload", "echo.test", 7002),
        _Held(bed, "held-download", "big.test", 7003),
    ]
    try:
        for transfer in held:
            transfer.wait_halfway()
        assert _whoami(bed, "n1.test") == {"connected": True}
        # The open transfers' own ports are rejected from now on: they must
        # run on regardless, on the outbound they have.
        _config(
            config,
            "micro",
            "DST-PORT,7002,REJECT",
            "DST-PORT,7003,REJECT",
            "DOMAIN,n1.test,REJECT",
        )
        log = _hup_and_wait(bed, "reloaded")
        assert "reload refused" not in log
        results = [transfer.finish() for transfer in held]
    finally:
        for transfer in held:
            transfer.kill()
    assert results == [{"sent": SIZE, "equal": True}, {"received": SIZE, "equal": True}]
    assert _whoami(bed, "n1.test") == {"error": "ECONNREFUSED"}
    assert bed.client_tool("upload", "echo.test", 7002, 1000) == {"error": "ECONNREFUSED"}
    assert _whoami(bed, "n2.test") == {"connected": True}
    assert bed.proc is not None and bed.proc.poll() is None


def test_a_bad_file_is_refused_with_one_line_and_changes_nothing(bed: Testbed) -> None:
    config = bed.tmp / "reload.toml"
    _config(config, "micro", "DOMAIN,n3.test,REJECT")
    _hup_and_wait(bed, "reloaded")
    assert _whoami(bed, "n3.test") == {"error": "ECONNREFUSED"}
    _config(config, "micro", "DOMAIN,n3.test,nowhere")
    log = _hup_and_wait(bed, "reload refused")
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 1 and "rules[0]" in refused[0] and "nowhere" in refused[0]
    assert "Traceback" not in log
    assert _whoami(bed, "n3.test") == {"error": "ECONNREFUSED"}
    assert _whoami(bed, "n4.test") == {"connected": True}
    assert bed.proc is not None and bed.proc.poll() is None


def test_a_setting_that_needs_a_restart_says_so_and_the_rest_applies(bed: Testbed) -> None:
    config = bed.tmp / "reload.toml"
    _config(config, "micro", "DOMAIN,n5.test,REJECT", extra="[stats]\ninterval = 30\n")
    log = _hup_and_wait(bed, "reloaded")
    lines = [line for line in log.splitlines() if "restart" in line]
    assert len(lines) == 1 and "stats.interval" in lines[0], lines
    assert _whoami(bed, "n5.test") == {"error": "ECONNREFUSED"}


WORKERS = 2


def _workers_bed(lab: Lab, tmp: Path) -> Testbed:
    bed = Testbed(lab, tmp)
    _config(tmp / "reload.toml", "dante")
    bed.proxy_args = ["--config", str(tmp / "reload.toml")]
    return bed


def test_workers_each_reload_on_the_parents_sighup() -> None:
    require("danted")
    with running_bed("t2sx-reloadw", _workers_bed, "--workers", str(WORKERS)) as bed:
        assert _whoami(bed, "n1.test") == {"connected": True}
        held = _Held(bed, "held-download", "big.test", 7003)
        try:
            held.wait_halfway()
            _config(
                bed.tmp / "reload.toml", "dante", "DOMAIN,n1.test,REJECT", "DST-PORT,7003,REJECT"
            )
            log = _hup_and_wait(bed, "reloaded", times=WORKERS)
            # The transfer open in one of the workers runs on to its last byte.
            assert held.finish() == {"received": SIZE, "equal": True}
        finally:
            held.kill()
        workers = re.findall(r"tun2sx\[(\d+)\]: tun2sx: reloaded", log)
        assert sorted(workers) == [str(i) for i in range(WORKERS)]
        # A worker's own settings (its stats port, no routes) are not changes.
        assert "restart" not in log
        # Each connection from a new port: the kernel spreads them over both queues.
        for _ in range(6):
            assert _whoami(bed, "n1.test") == {"error": "ECONNREFUSED"}
        assert _whoami(bed, "n2.test") == {"connected": True}
        assert bed.proc is not None and bed.proc.poll() is None


def test_flows_keep_an_outbound_the_new_file_removes(bed: Testbed) -> None:
    config = bed.tmp / "reload.toml"
    _config(config, "dante")
    _hup_and_wait(bed, "reloaded")
    held = [
        _Held(bed, "held-upload", "echo.test", 7002),
        _Held(bed, "held-download", "big.test", 7003),
    ]
    try:
        for transfer in held:
            transfer.wait_halfway()
        config.write_text(
            f'outbound = "micro"\n[outbounds.micro]\nurl = "socks5://{SERVER_ADDR}:1080"\n'
        )
        log = _hup_and_wait(bed, "reloaded")
        assert "default micro" in log
        results = [transfer.finish() for transfer in held]
    finally:
        for transfer in held:
            transfer.kill()
    assert results == [{"sent": SIZE, "equal": True}, {"received": SIZE, "equal": True}]
    assert _whoami(bed, "n1.test") == {"connected": True}
    assert "Traceback" not in bed.log()
    assert bed.proc is not None and bed.proc.poll() is None


def test_two_reloads_in_quick_succession_end_on_the_last_file(bed: Testbed) -> None:
    config = bed.tmp / "reload.toml"
    assert bed.proc is not None
    offset = bed.log_path.stat().st_size
    _config(config, "micro", "DOMAIN,n1.test,REJECT")
    bed.proc.send_signal(signal.SIGHUP)
    _config(config, "micro", "DOMAIN,n2.test,REJECT")
    bed.proc.send_signal(signal.SIGHUP)
    # Two signals this close may arrive as one; either way the file read
    # last is the second.
    deadline = time.monotonic() + 15
    while _whoami(bed, "n2.test") != {"error": "ECONNREFUSED"}:
        assert time.monotonic() < deadline, "the second file never applied"
    assert _whoami(bed, "n1.test") == {"connected": True}
    log = bed.log_path.read_bytes()[offset:].decode(errors="replace")
    assert "reload refused" not in log
    assert "Traceback" not in log, log


def test_a_new_fake_ip_filter_applies_to_the_next_query(bed: Testbed) -> None:
    config = bed.tmp / "reload.toml"

    def answer(name: str) -> str:
        argv = ["dig", "+short", "+time=3", "+tries=1", name, "A"]
        return bed.client_run(argv).stdout.strip()

    _config(config, "micro")
    _hup_and_wait(bed, "reloaded")
    assert answer("a.real.test").startswith("198.1")  # a fake IP
    _config(config, "micro", extra='[dns]\nfake_ip_filter = ["+.real.test"]\n')
    log = _hup_and_wait(bed, "reloaded")
    assert "restart" not in log
    # Resolved for real now: the test upstream knows no address for it.
    assert answer("b.real.test") == ""
    assert answer("c.fake.test").startswith("198.1")
