"""The transition table: every state resets to CLOSED, illegal moves raise."""

from __future__ import annotations

import pytest

from stack.errors import LocalProtocolError
from stack.tcp import TcpState
from stack.tcp.state import Stimulus, next_state


def test_a_transition_missing_from_the_table_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="no transition from"):
        next_state(TcpState.CLOSED, Stimulus.FIN_RECEIVED)
    with pytest.raises(LocalProtocolError):
        next_state(TcpState.TIME_WAIT, Stimulus.CLOSE)


def test_the_handshake_and_both_close_orders_follow_rfc_9293() -> None:
    assert next_state(TcpState.SYN_RECEIVED, Stimulus.ACK_OF_SYN) is TcpState.ESTABLISHED
    assert next_state(TcpState.ESTABLISHED, Stimulus.FIN_RECEIVED) is TcpState.CLOSE_WAIT
    assert next_state(TcpState.CLOSE_WAIT, Stimulus.CLOSE) is TcpState.LAST_ACK
    assert next_state(TcpState.ESTABLISHED, Stimulus.CLOSE) is TcpState.FIN_WAIT_1
    assert next_state(TcpState.FIN_WAIT_1, Stimulus.FIN_RECEIVED) is TcpState.CLOSING
    assert next_state(TcpState.CLOSING, Stimulus.ACK_OF_FIN) is TcpState.TIME_WAIT
