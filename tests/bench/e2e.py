"""End-to-end benchmark: real kernel clients through tun2sx, beside the kernel and sing-box.

    ./dev bench e2e [--seconds 5] [--connections 1000] [--requests 8000]
                    [--no-offload] [--mtu N] [--workers 2] [--udp-rates 200,500]
                    [--only kernel,tun2sx,singbox-gvisor,singbox-system] [--pipeline] [--tfo]
                    [--preconnect]

Builds the end-to-end testbed (client namespace with tun2sx on tun0, server
namespace with Dante and the test servers) and, beside it, one client
namespace per sing-box TUN peer (tests/bench/singbox.py: the gvisor and the
system stack, same TUN address and MTU, same Dante). Each measure is taken
on every column in turn, in the same minutes:

- kernel path: the same client talking to the same server straight over
  the veth, no TUN and no proxy;
- tun2sx, sing-box gvisor, sing-box system: through the TUN and Dante.

Measures:

- single-stream throughput up and down (iperf3, through Dante);
- connections per second (connect, one byte each way, close) from one
  Python client in a loop and from 8 threads, and HTTP requests per second with a new connection
  each from `ab` to nginx (both C, so the load generator does not take the
  CPU the proxy needs);
- time to the first byte of a new connection p50/p99 (connect, one byte
  each way, one connection at a time): the proxy handshake's share of it
  is what `--pipeline` and `--tfo` shorten;
- round-trip latency p50/p99 of 64-byte messages on one connection, idle
  and while an iperf3 download runs on another connection through the same
  path (what a bulk transfer does to an interactive flow beside it);
- UDP (tests/bench/udp.py, tun2sx and the kernel path only): iperf3 -u
  with 1200-byte datagrams at the offered rates, both ways, delivered and
  lost, tun2sx's CPU per datagram, and bursts of 50 datagrams beside Dante
  alone;
- the proxy's RSS idle and with N connections held open;
- tun2sx's connections per second with `--workers 2` (one process per queue).

`--pipeline` and `--tfo` set those options on tun2sx's outbound to Dante;
`--tfo` also lets every listener of the server namespace take TCP Fast
Open (net.ipv4.tcp_fastopen = 0x403 there, and Dante restarted to listen
under it: Dante does not ask for it on its socket), so the SYN carries the
SOCKS5 greeting (with `--pipeline`, the whole handshake).

A measure that fails (an iperf3 error, a peer that died) prints
`failed: reason` in its cell; the run goes on. Dante, not microsocks,
carries the traffic: microsocks caps near 0.4 Gbit/s. Output: one Markdown
table for docs/performance.md, with a header line naming the machine, its
load, the offload mode and the MTU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tests.bench import singbox
from tests.bench import udp as udp_bench
from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, iperf_gbps, rss_kib
from tun2sx.control.app import DEFAULT_MTU
from tun2sx.lab.netns import Lab, LabError, Namespace, missing_capabilities

IPERF_PORT = 5201
ECHO_PORT = 7001
NGINX_PORT = 8090
NGINX_CONF = """\
daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid; error_log stderr;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{ listen {addr}:{port}; keepalive_timeout 0; location / {{ return 200 "x"; }} }}
}}
"""

# Column keys, in table order; `--only` takes these.
KERNEL, TUN2SX = "kernel", "tun2sx"
SINGBOX = {f"singbox-{stack}": stack for stack in singbox.STACKS}
COLUMNS = (KERNEL, TUN2SX, *SINGBOX)
TITLES = {
    KERNEL: "kernel path (direct veth)",
    TUN2SX: "tun2sx",
    **{key: f"sing-box {stack}" for key, stack in SINGBOX.items()},
}


@dataclass
class Column:
    """One path the clients take to the servers: a column of the table.

    The hosts are what the clients in `ns` connect to: a test name (tun2sx's
    fake-IP DNS answers it), or the server's address (routed straight over
    the veth for the kernel path, into the peer's TUN for sing-box).
    """

    key: str
    ns: Namespace
    iperf_host: str
    echo_host: str
    # The process whose memory is reported (None: the kernel path has none).
    pid: Callable[[], int] | None = None
    # ab connects to an address; set once the name is resolved.
    http_host: str | None = None
    # Why the path could not be measured at all (its peer did not start).
    failure: str | None = None
    idle_rss_kib: int | None = None
    reported: bool = False  # `failure` is already in a cell of the table
    # Liveness check for a peer process: a reason once it has exited.
    exited: Callable[[], str | None] = field(default=lambda: None)


Row = tuple[str, dict[str, str]]


def _reason(exc: BaseException, limit: int = 160) -> str:
    """One short Markdown-safe line saying why a measure failed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    # The lab's command prefix says nothing the column does not.
    text = re.sub(r"ip netns exec \S+ ", "", text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


class FarSideDown(LabError):
    """A server every column needs (Dante, iperf3, nginx) has exited."""


def measure_row(
    table: list[Row],
    columns: list[Column],
    label: str,
    fn: Callable[[Column], str],
    far_side: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
    """Measure `fn` on each column in turn and append the row to `table`.

    Any error in one cell becomes `failed: reason` there: one peer's bad
    moment (an iperf3 error, a crash) must not cost the rest of a slow run.
    But when one of the `far_side` servers has exited, no column can be
    measured any more: raises FarSideDown, and the run ends (cleaning up).
    """
    for proc in far_side:
        if proc.poll() is not None:
            argv = proc.args if isinstance(proc.args, list) else [proc.args]
            raise FarSideDown(f"{' '.join(map(str, argv))} exited with {proc.returncode}")
    cells = {}
    for col in columns:
        if col.failure is None and (gone := col.exited()) is not None:
            col.failure = gone
        if col.failure is not None:
            # The reason once; later rows only point at it.
            cells[col.key] = "failed: see above" if col.reported else f"failed: {col.failure}"
            col.reported = True
            continue
        try:
            cells[col.key] = fn(col)
        except Exception as exc:  # any failure is reported in its cell
            cells[col.key] = f"failed: {_reason(exc)}"
    table.append((label, cells))
    print(f"bench e2e: {label}: {cells}", file=sys.stderr, flush=True)


def _start_nginx(server: Namespace, tmp: Path) -> subprocess.Popen[bytes]:
    """A C HTTP server answering one byte and closing: the peer of `_ab`."""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, addr=SERVER_ADDR, port=NGINX_PORT))
    proc = server.spawn(["nginx", "-c", str(conf)])
    server.wait_listening(NGINX_PORT)
    return proc


def _ab(ns: Namespace, host: str, requests: int, concurrency: int) -> tuple[float, int]:
    """Requests/s of `ab` (a new connection per request) and the failures.

    ab and nginx are C: the rate measures the path between them, not a
    Python load generator sharing the two cores with the proxy.
    """
    argv = ["ab", "-q", "-s", "10", "-n", str(requests), "-c", str(concurrency)]
    result = ns.run([*argv, f"http://{host}:{NGINX_PORT}/"], timeout=300, check=False)
    rate = re.search(r"Requests per second:\s+([\d.]+)", result.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", result.stdout)
    if rate is None or failed is None:
        raise LabError(f"ab exit {result.returncode}: {result.stderr.strip()[-200:]}")
    return float(rate.group(1)), int(failed.group(1))


def _tool(ns: Namespace, *args: object, timeout: float = 120) -> dict[str, float]:
    result = ns.run(
        [sys.executable, "-m", "tests.bench.netclient", *map(str, args)],
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _hold(col: Column, count: int, timeout: float = 180) -> str:
    """Open `count` echo connections through `col`; the proxy's RSS meanwhile."""
    assert col.pid is not None
    argv = [sys.executable, "-m", "tests.bench.netclient", "hold", col.echo_host]
    proc = col.ns.spawn(
        [*argv, str(ECHO_PORT), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        # The tool answers once all are open, or dies; a wedged peer must not
        # hang the run.
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            raise LabError(f"hold: no report within {timeout} s")
        line = proc.stdout.readline()
        if not line:
            raise LabError(f"hold: exited with status {proc.wait(10)} before its report")
        status = json.loads(line)
        rss = rss_kib(col.pid())
        proc.stdin.close()
        proc.wait(60)
    finally:
        col.ns.lab.stop(proc)  # by PID; a finished helper is not a failure
    return f"{rss / 1024:.1f} ({status['echoed']} echoed)"


def _iperf(col: Column, seconds: float, reverse: bool) -> str:
    gbps = iperf_gbps(col.ns, col.iperf_host, IPERF_PORT, seconds, reverse=reverse, omit=1)
    return f"{gbps:.2f}"


def _latency(col: Column) -> str:
    lat = _tool(col.ns, "latency", col.echo_host, ECHO_PORT, 2000)
    return f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f}"


def _first_byte(col: Column) -> str:
    got = _tool(col.ns, "firstbyte", col.echo_host, ECHO_PORT, 500)
    return f"{got['p50_ms']:.2f} / {got['p99_ms']:.2f}"


def _latency_under_download(col: Column, seconds: float) -> str:
    """p50/p99 of 64-byte round trips while iperf3 -R runs beside them.

    The bulk flow starts first and outlasts the round trips by a second
    on each side, so every sample is taken with the download in full
    flow; its rate shows how hard the path was loaded.
    """
    argv = ["iperf3", "-c", col.iperf_host, "-p", str(IPERF_PORT), "-R", "-J"]
    argv += ["-t", str(seconds + 2)]
    lat = None
    for attempt in range(4):
        bulk = col.ns.spawn(argv, stdout=subprocess.PIPE)
        try:
            time.sleep(1)
            if bulk.poll() is None:
                lat = _tool(col.ns, "latency", col.echo_host, ECHO_PORT, 10**6, seconds)
            out, _ = bulk.communicate(timeout=seconds + 60)
        finally:
            col.ns.lab.stop(bulk)
        result = json.loads(out or b"{}")
        # The iperf3 server may still be finishing the run before (its last
        # data drains through the proxy): it refuses at once; ask again.
        if "server is busy" in str(result.get("error", "")) and attempt < 3:
            time.sleep(0.5 * (attempt + 1))
            continue
        break
    if "error" in result or "end" not in result or lat is None:
        raise LabError(f"bulk iperf3: {result.get('error', 'no result')}")
    gbps = float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
    return f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} (bulk {gbps:.2f} Gbit/s)"


def _cps(col: Column, seconds: float, clients: int = 8) -> str:
    got = _tool(col.ns, "cps", col.echo_host, ECHO_PORT, seconds, clients)
    failed = f" ({got['failures']:.0f} failed)" if got["failures"] else ""
    return f"{got['cps']:.0f}{failed}"


def _ab_cell(col: Column, requests: int) -> str:
    if col.http_host is None:
        raise LabError("no address for nginx through this path")
    rate, failed = _ab(col.ns, col.http_host, requests, 8)
    return f"{rate:.0f}" + (f" ({failed} failed)" if failed else "")


def _path_mode(col: Column) -> str:
    """The device the column's traffic takes, as the kernel reports it.

    Its MTU, whether it carries the virtio-net header (offload), and the
    MSS a client connection through it ends up with: proof that `--mtu`
    reached the device and the client's route.
    """
    route = col.ns.run(["ip", "-o", "route", "get", SERVER_ADDR], check=False).stdout
    if col.key != KERNEL:
        dev = "tun0"
    elif found := re.search(r"\bdev (\S+)", route):
        dev = found.group(1)
    else:
        return f"no route to {SERVER_ADDR}"
    out = col.ns.run(["ip", "-d", "link", "show", dev], check=False).stdout
    mtu = re.search(r"\bmtu (\d+)", out)
    if mtu is None:
        return f"no {dev}"
    parts = [f"{'veth' if col.key == KERNEL else dev} mtu {mtu.group(1)}"]
    if vnet := re.search(r"vnet_hdr (on|off)", out):
        parts.append(f"vnet_hdr {vnet.group(1)}")
    try:
        parts.append(f"client MSS {_tool(col.ns, 'mss', col.echo_host, ECHO_PORT)['mss']}")
    except (LabError, ValueError, KeyError) as exc:
        parts.append(f"client MSS failed: {_reason(exc)}")
    return ", ".join(parts)


def _machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    except OSError:  # no procps: the kernel's own numbers say the same
        uptime = "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    uptime = uptime.strip()
    return f"nproc {os.cpu_count()}, {model}, kernel {os.uname().release}; uptime: {uptime}"


def _exited(
    lab: Lab, proc: Callable[[], subprocess.Popen[bytes] | None], what: str
) -> Callable[[], str | None]:
    def check() -> str | None:
        p = proc()
        if p is not None and p.poll() is not None:
            # Forget it, or the lab's own checks (run while starting tun2sx
            # again for --workers) would fail on this peer's exit.
            lab.stop(p)
            return f"{what} exited with status {p.returncode}"
        return None

    return check


@contextlib.contextmanager
def _tun2sx_column(bed: Testbed, args: list[str]) -> Iterator[Column]:
    col = Column(TUN2SX, bed.client, "big.test", "echo.test")
    try:
        bed.start(*args)
    except LabError as exc:
        col.failure = f"start: {_reason(exc)}"
    if col.failure is not None:
        if bed.proc is not None:
            bed.stop()
        yield col
        return
    assert bed.proc is not None
    pid = bed.proc.pid
    col.pid = lambda: pid
    col.exited = _exited(bed.lab, lambda: bed.proc, "tun2sx")
    col.idle_rss_kib = rss_kib(pid)
    # ab connects to an address: resolve the name through the fake-IP DNS once.
    fake = bed.client.run(["dig", "+short", "www.test"], check=False).stdout.strip()
    col.http_host = fake or None
    try:
        yield col
    finally:
        if bed.proc is not None:
            bed.stop()


def _singbox_column(
    key: str, lab: Lab, server: Namespace, tmp: Path, mtu: int, index: int
) -> tuple[Column, singbox.SingBox | None]:
    stack = SINGBOX[key]
    try:
        peer = singbox.SingBox(lab, server, tmp, stack, mtu, index)
    except LabError as exc:
        return Column(key, server, "", "", failure=f"setup: {_reason(exc)}"), None
    col = Column(key, peer.ns, SERVER_ADDR, SERVER_ADDR, http_host=SERVER_ADDR)
    try:
        peer.start()
    except LabError as exc:
        col.failure = f"start: {_reason(exc)}"
        return col, peer
    assert peer.proc is not None
    pid = peer.proc.pid
    col.pid = lambda: pid
    col.exited = _exited(lab, lambda: peer.proc, f"sing-box {stack}")
    col.idle_rss_kib = rss_kib(pid)
    return col, peer


def run(
    seconds: float,
    connections: int,
    offload: bool,
    *,
    mtu: int | None = None,
    workers: int = 2,
    requests: int = 8000,
    only: tuple[str, ...] = COLUMNS,
    udp_rates: tuple[int, ...] = (200, 500),
    udp_bursts: int = 100,
    pipeline: bool = False,
    tfo: bool = False,
    preconnect: bool = False,
) -> str:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = _machine()
    tun_mtu = mtu or DEFAULT_MTU
    t2sx_args = [*([] if offload else ["--no-offload"]), *(["--mtu", str(mtu)] if mtu else [])]
    table: list[Row] = []
    modes: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab("t2sx-bench"))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bed = Testbed(lab, tmp)
        # Every row opens thousands of connections, and the server side (Dante
        # to the echo server and nginx) keeps each in TIME-WAIT for a minute:
        # with the default 28k ephemeral ports Dante ran out in the later rows
        # and answered "network unreachable". Its namespace gets the whole
        # range and reuses TIME-WAIT ports for new outgoing connections.
        bed.server.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"])
        bed.server.run(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
        iperf = bed.server.spawn(["iperf3", "-s", "-B", SERVER_ADDR, "-p", str(IPERF_PORT)])
        bed.server.wait_listening(IPERF_PORT)
        bed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
        # Dante reads ahead: the handshake can go in one write.
        switches = (("pipeline=1", pipeline), ("tfo=1", tfo), ("preconnect=1", preconnect))
        flags = [f for f, on in switches if on]
        if flags:
            bed.proxy_args = ["--proxy", f"socks5://{SERVER_ADDR}:1081?{'&'.join(flags)}"]
        if tfo:
            # 0x400: every listener takes Fast Open, without the socket
            # option; the kernel reads it at listen(), so Dante starts again.
            bed.server.run(["sysctl", "-q", "-w", "net.ipv4.tcp_fastopen=1027"])
            bed.kill_dante()
            bed.start_dante()
        bed.verbosity = []
        nginx = _start_nginx(bed.server, tmp)

        columns: list[Column] = []
        for key in (k for k in COLUMNS if k in only):
            if key == KERNEL:
                col = Column(KERNEL, bed.client, SERVER_ADDR, SERVER_ADDR, http_host=SERVER_ADDR)
            elif key == TUN2SX:
                col = stack.enter_context(_tun2sx_column(bed, t2sx_args))
            else:
                index = 1 + list(SINGBOX).index(key)
                col, peer = _singbox_column(key, lab, bed.server, tmp, tun_mtu, index)
                if peer is not None:
                    stack.callback(peer.stop)
            columns.append(col)
            modes[key] = _path_mode(col) if col.failure is None else "-"

        stopped = None
        try:
            row = functools.partial(measure_row, table, columns, far_side=(bed.dante, iperf, nginx))
            for label, reverse in (("upload Gbit/s", False), ("download Gbit/s", True)):
                row(label, functools.partial(_iperf, seconds=seconds, reverse=reverse))
            row(
                "connections/s (one client: connect, 1 byte each way, close)",
                lambda c: _cps(c, seconds, clients=1),
            )
            row("connections/s (8 Python threads)", lambda c: _cps(c, seconds))
            row(
                "connections/s (ab -c 8 to nginx, one request each)",
                lambda c: _ab_cell(c, requests),
            )
            row(
                "first byte p50 / p99 ms, new connection (connect, 1 byte each way)",
                _first_byte,
            )
            row("latency p50 / p99 ms, 64 B round trip, idle", _latency)
            row(
                "latency p50 / p99 ms, 64 B round trip, beside an iperf3 download",
                lambda c: _latency_under_download(c, seconds),
            )
            tun2sx_up = next((c for c in columns if c.key == TUN2SX and c.failure is None), None)
            if udp_rates and tun2sx_up is not None:
                # tests/bench/udp.py: tun2sx on Dante beside the kernel path
                # (sing-box's columns are not measured there).
                try:
                    udp_rows = udp_bench.measure(
                        bed, rates=udp_rates, seconds=seconds, bursts=udp_bursts
                    )
                except Exception as exc:  # reported in the table, like measure_row's
                    udp_rows = [udp_bench.Row("UDP", f"failed: {_reason(exc)}", "-")]
                for name, ours, kernel in udp_rows:
                    cells = {c.key: "-" for c in columns}
                    cells[TUN2SX] = ours
                    if KERNEL in cells:
                        cells[KERNEL] = kernel
                    table.append((f"UDP: {name}", cells))
            row(
                "RSS MiB, idle",
                lambda c: "-" if c.idle_rss_kib is None else f"{c.idle_rss_kib / 1024:.1f}",
            )
            row(
                f"RSS MiB, {connections} open connections",
                lambda c: "-" if c.pid is None else _hold(c, connections),
            )
            tun2sx_col = next((c for c in columns if c.key == TUN2SX), None)
            if workers > 1 and tun2sx_col is not None and tun2sx_col.failure is None:
                # The same connection test with one process per queue; the other
                # columns have no such mode.
                bed.stop()
                cells = {c.key: "-" for c in columns}
                try:
                    bed.start("--workers", str(workers), *t2sx_args)
                    cells[TUN2SX] = _ab_cell(tun2sx_col, requests)
                except Exception as exc:  # reported in its cell, like measure_row's
                    cells[TUN2SX] = f"failed: {_reason(exc)}"
                table.append(
                    (f"connections/s (ab -c 8 to nginx), tun2sx --workers {workers}", cells)
                )

        except FarSideDown as exc:
            # What was measured so far is still worth printing.
            stopped = _reason(exc)

    keys = [c.key for c in columns]
    lines = [
        f"{started}; {machine}; offload {'on' if offload else 'off'} (tun2sx), MTU {tun_mtu}"
        + ("; SOCKS5 pipelined (tun2sx)" if pipeline else "")
        + ("; TCP Fast Open to Dante (tun2sx)" if tfo else "")
        + ("; SOCKS5 preconnect (tun2sx)" if preconnect else "")
        + (f"; {singbox.version()}" if any(k in SINGBOX for k in keys) else ""),
        "",
        "Paths as the kernel sees them: " + "; ".join(f"{TITLES[k]}: {modes[k]}" for k in keys),
        "",
        "| measure | " + " | ".join(TITLES[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
        *(f"| {label} | " + " | ".join(cells[k] for k in keys) + " |" for label, cells in table),
    ]
    if stopped is not None:
        lines += ["", f"Run stopped early: {stopped}."]
    return "\n".join(lines)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C does, so the lab ends its processes and
    # deletes its namespaces on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench e2e")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=8000, help="ab requests per column")
    parser.add_argument(
        "--no-offload", action="store_true", help="tun2sx opens its TUN without virtio-net header"
    )
    parser.add_argument("--mtu", type=int, help=f"TUN MTU for tun2sx and sing-box ({DEFAULT_MTU})")
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure connections/s with N workers (1: skip)"
    )
    parser.add_argument(
        "--udp-rates",
        default="200,500",
        help="offered Mbit/s of the UDP rows, comma-separated (empty: no UDP rows)",
    )
    parser.add_argument(
        "--only",
        default=",".join(COLUMNS),
        help=f"comma-separated columns to measure, of {','.join(COLUMNS)}",
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="tun2sx sends its SOCKS5 handshake to Dante in one write (?pipeline=1)",
    )
    parser.add_argument(
        "--tfo",
        action="store_true",
        help="tun2sx connects to Dante with TCP Fast Open (?tfo=1; Dante's side enabled)",
    )
    parser.add_argument(
        "--preconnect",
        action="store_true",
        help="tun2sx keeps a greeted connection to Dante ready for the next flow (?preconnect=1)",
    )
    args = parser.parse_args(argv)
    only = tuple(k.strip() for k in args.only.split(",") if k.strip())
    unknown = [k for k in only if k not in COLUMNS]
    if unknown:
        parser.error(f"--only: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
    missing = missing_capabilities()
    if missing:
        print(f"bench e2e: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        table = run(
            args.seconds,
            args.connections,
            not args.no_offload,
            mtu=args.mtu,
            workers=args.workers,
            requests=args.requests,
            only=only,
            udp_rates=tuple(int(r) for r in args.udp_rates.split(",") if r.strip()),
            pipeline=args.pipeline,
            tfo=args.tfo,
            preconnect=args.preconnect,
        )
    except KeyboardInterrupt:
        # run()'s context managers have already ended the lab's processes
        # and deleted its namespaces on the way out.
        print("bench e2e: interrupted", file=sys.stderr)
        return 130
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
