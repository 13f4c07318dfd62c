"""The parent's endpoint with several workers: totals read, writes refused."""

from __future__ import annotations

import functools
import socket

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controller import FakeEngine, request, start_controller
from tun2sx.control.controller import Controller, Request
from tun2sx.control.totals import WORKER_TIMEOUT, Totals, serve_totals

AUTH = [("Authorization", "Bearer s3cret")]


async def start_workers(nursery: trio.Nursery, secret: str | None = None):
    engines, ports = [], []
    for host, up, when in (("a.example", 1, 1_700_000_000.0), ("b.example", 10, 1_600_000_000.0)):
        engine = FakeEngine()
        engine.counters.update(tcp_flows=1, tcp_flows_started=3)
        engine.add_flow(host, up=up).wall_started = when
        engines.append(engine)
        ports.append(await start_controller(nursery, Controller(engine, secret=secret)))  # type: ignore[arg-type]
    front = socket.create_server(("127.0.0.1", 0))
    front_port = front.getsockname()[1]
    workers = [("127.0.0.1", port) for port in ports]
    await nursery.start(functools.partial(serve_totals, [front], workers, secret))
    return engines, workers, front_port


async def test_totals_add_up_the_workers(nursery: trio.Nursery) -> None:
    _, _, port = await start_workers(nursery, "s3cret")
    assert (await request(port, "GET", "/stats")).status == 401
    stats = (await request(port, "GET", "/stats", headers=AUTH)).json()
    assert stats == {"tcp_flows": 2, "tcp_flows_started": 6, "bytes_up": 11, "bytes_down": 0}
    data = (await request(port, "GET", "/connections", headers=AUTH)).json()
    assert data["uploadTotal"] == 11
    rows = data["connections"]
    # Oldest first, each with the worker that has it.
    assert [(r["metadata"]["host"], r["worker"]) for r in rows] == [
        ("b.example", 1),
        ("a.example", 0),
    ]
    text = (await request(port, "GET", "/metrics", headers=AUTH)).body.decode()
    samples = {
        (s.name, s.labels.get("worker")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("tun2sx_tcp_flows_open", "0")] == 1
    assert samples[("tun2sx_tcp_flows_open", "1")] == 1
    assert (await request(port, "GET", "/version", headers=AUTH)).json()["meta"] is True


async def test_writes_and_streams_are_refused_with_the_worker_ports(
    nursery: trio.Nursery,
) -> None:
    engines, workers, port = await start_workers(nursery)
    flow_id = next(iter(engines[0].flows)).id
    answer = await request(port, "DELETE", f"/connections/{flow_id}")
    assert answer.status == 501
    text = answer.json()["message"]
    assert "2 workers" in text and str(workers[1][1]) in text
    assert (await request(port, "PATCH", "/configs", body={"mode": "direct"})).status == 501
    assert (await request(port, "GET", "/traffic")).status == 501
    assert not engines[0].closed
    # The worker's own port does it.
    worker_port = workers[0][1]
    assert (await request(worker_port, "DELETE", f"/connections/{flow_id}")).status == 204
    assert engines[0].closed == [flow_id]


async def test_a_worker_that_is_gone_or_hangs_is_named(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    gone = socket.create_server(("127.0.0.1", 0))
    gone_port = gone.getsockname()[1]
    gone.close()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    with silent:
        silent_port = silent.getsockname()[1]
        totals = Totals([("127.0.0.1", gone_port), ("127.0.0.1", silent_port)])
        get = Request("GET", "/stats", {}, {"host": "127.0.0.1"})
        answer = await totals.answer(get)
        assert answer.status == 503  # type: ignore[union-attr]
        assert f"worker 0 (port {gone_port}) did not answer" in answer.body.decode()  # type: ignore[union-attr]
        totals = Totals([("127.0.0.1", silent_port)])
        answer = await totals.answer(get)
    assert f"no answer within {WORKER_TIMEOUT:g} s" in answer.body.decode()  # type: ignore[union-attr]


async def test_a_worker_that_resets_mid_answer_is_named(nursery: trio.Nursery) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def reset_once_asked() -> None:
        with listener:
            conn, _ = await listener.accept()
            with conn:
                # Closed with the request unread: the kernel answers with an
                # RST, as when a worker is killed mid-answer.
                await trio.lowlevel.wait_readable(conn)

    nursery.start_soon(reset_once_asked)
    totals = Totals([("127.0.0.1", port)])
    answer = await totals.answer(Request("GET", "/stats", {}, {"host": "127.0.0.1"}))
    assert answer.status == 503  # type: ignore[union-attr]
    assert f"worker 0 (port {port}) did not answer" in answer.body.decode()  # type: ignore[union-attr]
