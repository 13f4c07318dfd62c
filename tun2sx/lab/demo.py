"""`tun2sx demo`: the whole path, end to end, in a private network lab.

Two namespaces joined by a veth pair:

    client ns                                    server ns
    curl http://demo.tun2sx.test/                microsocks 10.200.0.2:1080
      | DNS 198.18.0.2 -> fake IP 198.18.x.y     HTTP server 10.200.0.2:8080
      | default route -> tun0                    hosts: demo.tun2sx.test -> 10.200.0.2
    tun2sx --tun tun0 --socks 10.200.0.2:1080
      | 10.200.0.1 ------------ veth ------------ 10.200.0.2

curl resolves the name through tun2sx's fake-IP DNS, connects to the fake
IP, tun2sx maps it back to the name and asks the SOCKS5 server to connect
to `demo.tun2sx.test:8080`; the server resolves it on its side. The demo
prints each step and removes everything it created.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tun2sx.lab.netns import Lab, LabError, missing_capabilities

NAME = "demo.tun2sx.test"
PAGE = "<h1>Hello from the far side of tun2sx</h1>\n"


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="tun2sx demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep-log", action="store_true", help="print tun2sx's log at the end")
    args = parser.parse_args(list(argv))
    missing = missing_capabilities()
    for tool in ("microsocks", "curl"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if missing:
        print(
            f"tun2sx demo: needs {', '.join(missing)} (run it as root via ./dev demo)",
            file=sys.stderr,
        )
        return 2
    with Lab("t2sx-demo") as lab, tempfile.TemporaryDirectory() as tmp:
        try:
            return _run(lab, Path(tmp), args.keep_log)
        except LabError as exc:
            print(f"tun2sx demo: {exc}", file=sys.stderr)
            return 1


def _run(lab: Lab, tmp: Path, keep_log: bool) -> int:
    client = lab.namespace("client")
    server = lab.namespace("server")
    lab.link(client, ["10.200.0.1/24"], server, ["10.200.0.2/24"])
    _say(f"namespaces {client} and {server}, veth 10.200.0.1 <-> 10.200.0.2")

    server.write_etc("hosts", f"127.0.0.1 localhost\n10.200.0.2 {NAME}\n")
    client.write_etc("resolv.conf", "nameserver 198.18.0.2\n")
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text(PAGE)
    server.spawn(
        [
            sys.executable,
            "-m",
            "http.server",
            "8080",
            "--bind",
            "10.200.0.2",
            "--directory",
            str(www),
        ]
    )
    server.spawn(["microsocks", "-i", "10.200.0.2", "-p", "1080"])
    server.wait_listening(8080)
    server.wait_listening(1080)
    _say("server side: HTTP on 10.200.0.2:8080, microsocks SOCKS5 on 10.200.0.2:1080")

    log_path = tmp / "tun2sx.log"
    with log_path.open("wb") as log_file:
        proc = client.spawn(
            [
                sys.executable,
                "-m",
                "tun2sx",
                "--tun",
                "tun0",
                "--tun-address",
                "198.18.0.1/15",
                "--socks",
                "10.200.0.2:1080",
                "--fake-ip-db",
                str(tmp / "fakeip.sqlite"),
                "-v",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        client.wait_link("tun0")
        client.run(["ip", "route", "add", "default", "dev", "tun0"])
        _say("client side: tun2sx serves tun0 (198.18.0.1/15), default route -> tun0")

        dig = client.run(["getent", "hosts", NAME], check=False)
        _say(f"resolving {NAME} inside the client namespace: {dig.stdout.strip() or dig.stderr}")
        result = client.run(
            ["curl", "-sS", "--max-time", "10", f"http://{NAME}:8080/"], check=False
        )
        lab.stop(proc)
    ok = result.returncode == 0 and result.stdout == PAGE
    if ok:
        _say(f"curl http://{NAME}:8080/ through tun2sx -> {result.stdout.strip()!r}")
    else:
        _say(f"curl failed (exit {result.returncode}): {result.stderr.strip()}")
    log_text = log_path.read_text(errors="replace")
    if keep_log or not ok:
        print(log_text, end="")
    else:
        for line in log_text.splitlines():
            if "connected" in line or "serving" in line or "stopped" in line:
                _say(f"tun2sx log: {line.split(': ', 1)[-1]}")
    _say("cleaned up" if ok else "FAILED")
    return 0 if ok else 1
