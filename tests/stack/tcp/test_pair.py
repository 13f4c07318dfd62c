"""Two connections over a seeded lossy link: the exact bytes arrive both ways.

Each run moves a few hundred KB in both directions over a link that drops,
duplicates and reorders segments, with a simulated clock that jumps to the
next arrival or deadline; both ends must receive the exact byte stream, see
EOF, and close. Under 2% loss, recovery must come from fast retransmit and
SACK, not from retransmission timeouts.
"""

from __future__ import annotations

import random

import pytest

from stack.tcp import TcpConfig, TcpStatistics

from .helpers import Endpoint, run_transfer

SEEDS = range(24)


def _payloads(seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    return rng.randbytes(200_000 + rng.randrange(100_000)), rng.randbytes(300_000)


def _check(server: Endpoint, client: Endpoint, a: bytes, b: bytes) -> None:
    assert bytes(server.received) == a
    assert bytes(client.received) == b
    assert server.finished() and client.finished()


def _sum(stats: list[TcpStatistics], field: str) -> int:
    return sum(getattr(st, field) for st in stats)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_delivery_under_loss_duplication_and_reordering(seed: int) -> None:
    a, b = _payloads(seed)
    server, client, _ = run_transfer(seed, a, b, loss=0.02, dup=0.01, reorder=0.03)
    _check(server, client, a, b)


def test_loss_is_repaired_by_fast_retransmit_and_sack_not_by_timeouts() -> None:
    stats: list[TcpStatistics] = []
    durations = []
    for seed in SEEDS:
        a, b = _payloads(seed)
        server, client, end = run_transfer(seed, a, b, loss=0.02)
        _check(server, client, a, b)
        stats += [server.conn.statistics(), client.conn.statistics()]
        durations.append(end)
    fast, sack, rto = (
        _sum(stats, f) for f in ("fast_retransmits", "sack_retransmits", "rto_timeouts")
    )
    assert fast > 0 and sack > 0
    # Timeouts are the exception (tail losses), not the way losses get repaired.
    assert fast + sack > 8 * rto
    # With 5 ms one-way delay, a transfer that stalled on an RTO for most
    # losses would take seconds; here the median run stays well under one.
    assert sorted(durations)[len(durations) // 2] < 1.0


def test_newreno_without_sack_still_delivers_everything() -> None:
    cfg = TcpConfig(sack=False)
    stats: list[TcpStatistics] = []
    for seed in range(12):
        a, b = _payloads(seed)
        server, client, _ = run_transfer(seed, a, b, loss=0.02, server_cfg=cfg, client_cfg=cfg)
        _check(server, client, a, b)
        stats += [server.conn.statistics(), client.conn.statistics()]
    assert _sum(stats, "sack_retransmits") == 0
    assert _sum(stats, "fast_retransmits") > _sum(stats, "rto_timeouts")


@pytest.mark.parametrize(
    "cfg",
    [
        TcpConfig(timestamps=False, window_scaling=False),
        TcpConfig(mss=65495, rcv_buf=1 << 20, snd_buf=1 << 20, max_ooo_bytes=1 << 20),
        TcpConfig(rcv_buf=8192, snd_buf=8192, mss=1000),
    ],
    ids=["no-ts-no-wscale", "64k-mss", "small-buffers"],
)
def test_other_option_sets_deliver_everything(cfg: TcpConfig) -> None:
    for seed in range(6):
        a, b = _payloads(seed)
        server, client, _ = run_transfer(
            seed, a, b, loss=0.02, dup=0.01, reorder=0.03, server_cfg=cfg, client_cfg=cfg
        )
        _check(server, client, a, b)


def test_heavy_loss_still_delivers() -> None:
    for seed in range(4):
        a, b = _payloads(seed)
        server, client, _ = run_transfer(seed, a[:50_000], b[:50_000], loss=0.15, reorder=0.1)
        _check(server, client, a[:50_000], b[:50_000])


def test_gso_sends_super_segments_and_still_delivers_under_loss() -> None:
    # The server side hands 64 KB segments to a device that cuts them; the
    # client (the application's kernel) accepts segments above its MSS.
    server_cfg = TcpConfig(gso_size=64000, rcv_buf=1 << 20, snd_buf=1 << 20)
    client_cfg = TcpConfig(rcv_buf=1 << 20, snd_buf=1 << 20)
    for seed in range(6):
        a, b = _payloads(seed)
        b = b * 3
        server, client, _ = run_transfer(
            seed, a, b, loss=0.02, reorder=0.03, server_cfg=server_cfg, client_cfg=client_cfg
        )
        _check(server, client, a, b)
        stats = server.conn.statistics()
        # 900 KB in segments of at most 1448 bytes would take over 600.
        assert stats.segments_out < 400
