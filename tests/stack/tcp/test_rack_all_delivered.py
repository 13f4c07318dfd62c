"""`Rack.all_delivered` against `Rack.detect`: the same state and the same
answer when a cumulative ACK covers everything sent, nothing is SACKed and
no retransmission is tracked (a round trip's answer, ACKed whole).

Hypothesis plays a history of first transmissions (single segments and
runs), partial cumulative ACKs judged by `detect`, and timeouts, then
ACKs all of it; one twin takes the last ACK through `detect`, the other
through `all_delivered`.
"""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.tcp.congestion import Scoreboard
from stack.tcp.rack import Rack

_STEP = st.tuples(
    st.sampled_from(("send", "run", "ack", "timeout")),
    st.integers(1, 3000),  # octets
    st.floats(0, 0.05),  # time passing
    st.integers(1, 4),  # segments in a run
)


def _state(rack: Rack) -> dict[str, object]:
    return {name: copy.copy(getattr(rack, name)) for name in Rack.__slots__}


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_STEP, max_size=30), gap=st.floats(0, 0.5), start=st.integers(0, 2**40))
def test_all_delivered_is_detect_for_a_flight_acked_whole(
    steps: list[tuple[str, int, float, int]], gap: float, start: int
) -> None:
    rack = Rack()
    now = 1.0
    una = end = start
    for kind, size, passing, count in steps:
        now += passing
        if kind == "send":
            end += size
            rack.sent(end, now)
        elif kind == "run":
            rack.sent_run(end, end + size * count, size, now)
            end += size * count
        elif kind == "ack":
            una = min(end, una + size)
            rack.detect(una, Scoreboard(), now, una)
        else:
            rack.timeout()
    now += gap
    twin = copy.deepcopy(rack)
    assert rack.detect(end, Scoreboard(), now, end) == ([], None)
    twin.all_delivered(end, now)
    assert _state(twin) == _state(rack)
