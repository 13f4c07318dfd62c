"""tun2sx in this process, with its select groups switched from stdin.

    python -m tests.e2e.selectdriver CONFIG.toml

Runs `serve` on the config file (which names the device), prints
``serving`` once the engine runs, then takes lines ``GROUP MEMBER`` and
calls that group's `select`, answering ``selected MEMBER`` (or ``error:
...``). Closing stdin stops it. What a controller's ``PUT /proxies/GROUP``
does, without the controller.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import trio

from outbounds.group import ProxyGroup
from tun2sx.control.app import serve
from tun2sx.control.config import load_config


async def main(path: str) -> None:
    settings = load_config(path)
    async with trio.open_nursery() as nursery:
        engine = await nursery.start(functools.partial(serve, settings, handle_signals=False))
        print("serving", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        pending = b""
        while data := await stdin.receive_some():
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                name, member = line.decode().split()
                group = engine.router.outbounds[name]
                assert isinstance(group, ProxyGroup)
                try:
                    group.select(member)
                except ValueError as exc:
                    print(f"error: {exc}", flush=True)
                else:
                    print(f"selected {group.now()}", flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    trio.run(main, sys.argv[1])
