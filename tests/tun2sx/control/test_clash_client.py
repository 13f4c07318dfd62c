"""A third-party Clash API client (PyPI's clash-controller-api, on aiohttp)
against the controller: what it detects and reads is what a dashboard gets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import trio
from clash_controller_api import ClashAPI
from clash_controller_api.exceptions import APIAuthError

from tests.support.controller import FakeEngine, start_controller
from tun2sx.control.controller import Controller


async def run_client(port: int, token: str, work: Any) -> Any:
    """Run `work(api)` in asyncio, in a thread of its own."""

    async def main() -> Any:
        async with aiohttp.ClientSession() as session:
            api = ClashAPI(f"http://127.0.0.1:{port}", token, session=session)
            return await work(api)

    return await trio.to_thread.run_sync(asyncio.run, main())


async def test_the_client_detects_and_reads_everything(nursery: trio.Nursery) -> None:
    engine = FakeEngine()
    flow = engine.add_flow("www.example.com", 443, up=5, down=9)
    port = await start_controller(nursery, Controller(engine, secret="t0ken"))  # type: ignore[arg-type]

    async def work(api: ClashAPI) -> Any:
        await api.async_validate_connection()
        version = await api.async_get_version()
        report = await api.async_detect_capabilities()
        data = await api.async_fetch_data()
        await api.async_request("PUT", "proxies/proxy", json_data={"name": "REJECT"})
        await api.async_request("DELETE", f"connections/{flow.id}")
        return version, dict(report), data

    version, capabilities, data = await run_client(port, "t0ken", work)
    assert version.meta == "Meta Core" and version.version == "0.1.0"
    for name in (
        "proxies",
        "connections",
        "configs",
        "rules",
        "traffic",
        "memory",
        "ws_traffic",
        "ws_memory",
        "ws_connections",
    ):
        assert capabilities[name], name
    assert not data.errors
    assert data["traffic"] == {"up": 0, "down": 0}
    assert data["memory"]["inuse"] > 0
    (connection,) = data["connections"]["connections"]
    assert connection["metadata"]["host"] == "www.example.com"
    assert data["proxies"]["proxies"]["proxy"]["type"] == "Selector"
    assert data["configs"]["mode"] == "rule"
    assert engine.group.now() == "REJECT"
    assert engine.closed == [flow.id]


async def test_the_client_sees_a_wrong_secret(nursery: trio.Nursery) -> None:
    port = await start_controller(nursery, Controller(FakeEngine(), secret="t0ken"))  # type: ignore[arg-type]

    async def work(api: ClashAPI) -> Any:
        try:
            await api.async_validate_connection()
        except APIAuthError as exc:
            return exc
        return None

    assert isinstance(await run_client(port, "wrong", work), APIAuthError)
