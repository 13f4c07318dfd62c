"""Loss tolerance: a random loss costs a retransmission, not half the rate.

`Congestion` keeps the window after a loss at twice the measured
bandwidth-delay product (the highest delivery rate of the last ten round
trips times the smallest RTT) when that is more than NewReno's half of the
flight. Checked here on the model itself, then end to end on a simulated
bottleneck link: under random loss the transfer is much faster than with
plain NewReno, and when the loss comes from a full queue instead, the
floor does not make the queue overflow more.
"""

from __future__ import annotations

import random
import statistics

from stack.tcp import TcpConfig
from stack.tcp.congestion import Congestion

from .helpers import LossyLink, run_transfer

MSS = 1000
RTT = 0.01


def _steady(cc: Congestion, rate: float, rounds: int, start: float = 0.0) -> float:
    """Deliver `rate` octets/s for `rounds` round trips of RTT; return the time.

    One ACK per round trip; each delivers a packet sent after the previous
    one's SND.MAX, so each ends a round.
    """
    now = start
    pos = cc.delivered
    per_round = int(rate * RTT)
    for _ in range(rounds):
        now += RTT
        pos += per_round
        cc.on_delivered(per_round, pos, pos + per_round - MSS, now)
    return now


def _congestion(loss_floor: bool = True) -> Congestion:
    cc = Congestion(MSS, 10, loss_floor)
    cc.min_rtt = RTT
    return cc


def test_a_loss_keeps_twice_the_measured_bandwidth_delay_product() -> None:
    cc = _congestion()
    _steady(cc, 1_000_000, 12)  # 10 000 octets per round trip
    # A flight of 12 000: NewReno would halve it to 6000.
    cc.enter_recovery(una=0, snd_max=12_000, sack=True)
    assert cc.ssthresh == 20_000
    assert cc.loss_floor() == 20_000


def test_a_flight_above_the_floor_is_still_halved() -> None:
    cc = _congestion()
    _steady(cc, 1_000_000, 12)
    cc.enter_recovery(una=0, snd_max=100_000, sack=True)
    assert cc.ssthresh == 50_000


def test_without_a_measurement_or_when_disabled_it_is_newreno() -> None:
    fresh = _congestion()
    fresh.enter_recovery(una=0, snd_max=12_000, sack=True)
    off = _congestion(loss_floor=False)
    _steady(off, 1_000_000, 12)
    off.enter_recovery(una=0, snd_max=12_000, sack=True)
    no_rtt = Congestion(MSS, 10)
    _steady(no_rtt, 1_000_000, 12)
    no_rtt.enter_recovery(una=0, snd_max=12_000, sack=True)
    assert fresh.ssthresh == off.ssthresh == no_rtt.ssthresh == 6000


def test_the_floor_follows_the_delivery_rate_down_after_ten_round_trips() -> None:
    cc = _congestion()
    now = _steady(cc, 1_000_000, 12)
    now = _steady(cc, 200_000, 9, now)
    assert cc.loss_floor() == 20_000  # the fast rounds are still in the window
    # The first slow round lasts until the last fast flight is delivered.
    _steady(cc, 200_000, 10, now)
    assert cc.loss_floor() == 4000


def test_acks_bunched_together_do_not_overstate_the_rate() -> None:
    cc = _congestion()
    now = _steady(cc, 1_000_000, 12)
    # A round trip whose ACKs all arrive within 1 ms (a busy receiver):
    # the rate is taken over at least min_rtt, not over the millisecond.
    pos = cc.delivered
    cc.on_delivered(10_000, pos + 10_000, pos + 20_000, now + 0.001)
    cc.on_delivered(10_000, pos + 20_000, pos + 30_000, now + 0.002)
    assert cc.loss_floor() == 20_000


def test_a_round_with_no_duration_gives_no_rate() -> None:
    # Before RACK's first RTT sample there is no min_rtt to bound the
    # round by; rounds that end at the instant they began are skipped.
    cc = Congestion(MSS, 10)
    cc.on_delivered(1000, 1000, 5000, 1.0)
    cc.on_delivered(5000, 6000, 9000, 1.0)
    cc.min_rtt = RTT
    assert cc.loss_floor() == 0


def test_a_timeout_keeps_the_floor_as_its_slow_start_threshold() -> None:
    cc = _congestion()
    _steady(cc, 1_000_000, 12)
    cc.on_rto(una=0, snd_max=12_000, first=True)
    assert (cc.cwnd, cc.ssthresh) == (MSS, 20_000)


def _transfers(
    loss_floor: bool, *, loss: float, buffer: int, size: int, seeds: int
) -> tuple[float, int]:
    """Median time and total queue overflows of server->client transfers."""
    cfg = TcpConfig(loss_floor=loss_floor)
    ends, overflows = [], 0
    for seed in range(seeds):
        data = random.Random(seed).randbytes(size)
        # 100 Mbit/s, 5 ms each way: a bandwidth-delay product of 125 KB.
        link = LossyLink(random.Random(seed), loss=loss, delay=0.005, rate=12.5e6, buffer=buffer)
        _, client, end = run_transfer(seed, b"", data, server_cfg=cfg, client_cfg=cfg, link=link)
        assert bytes(client.received) == data
        ends.append(end)
        overflows += link.overflows
    return statistics.median(ends), overflows


def test_under_random_loss_the_floor_keeps_the_link_busy() -> None:
    plain, _ = _transfers(False, loss=0.02, buffer=256 * 1024, size=500_000, seeds=8)
    floor, _ = _transfers(True, loss=0.02, buffer=256 * 1024, size=500_000, seeds=8)
    # 500 KB at 100 Mbit/s is 40 ms of sending; NewReno, halving at every
    # loss of a 2 % lossy link, takes several times longer.
    assert floor < 0.5 * plain


def test_a_full_queue_does_not_overflow_more_with_the_floor() -> None:
    # No random loss: every drop is the queue (a quarter of the BDP) overflowing.
    plain, plain_drops = _transfers(False, loss=0.0, buffer=32 * 1024, size=2_000_000, seeds=4)
    floor, floor_drops = _transfers(True, loss=0.0, buffer=32 * 1024, size=2_000_000, seeds=4)
    assert plain_drops > 0
    assert floor_drops <= 1.25 * plain_drops
    assert floor <= 1.1 * plain
