"""TCP connection states and the one table of legal transitions.

Everything that moves a connection from one state to another goes through
`next_state`, so the whole RFC 9293 state diagram (section 3.3.2, passive
side) can be read in `_TRANSITIONS` below. A stimulus the table does not
list for the current state is a bug in the caller and raises
`LocalProtocolError`, as in h11.

LISTEN and SYN-SENT exist for completeness of the RFC names: tun2sx only
opens passively, and a connection object is born in SYN-RECEIVED (the demux
plays the listener).
"""

from __future__ import annotations

import enum

from stack.errors import LocalProtocolError


class TcpState(enum.Enum):
    """RFC 9293 connection states."""

    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"

    # Members are singletons: identity is their equality, so the C slot
    # hashes them instead of Enum's Python-level `hash(self._name_)`, a
    # function call for every table and set lookup of a state (about 20
    # per connection).
    __hash__ = object.__hash__


class Stimulus(enum.Enum):
    """What can move a connection between states."""

    __hash__ = object.__hash__  # as TcpState's: the transition table's keys

    ACK_OF_SYN = enum.auto()  # the peer acknowledged our SYN
    FIN_RECEIVED = enum.auto()  # the peer's FIN is next in sequence
    CLOSE = enum.auto()  # our FIN is sent (after buffered data)
    ACK_OF_FIN = enum.auto()  # the peer acknowledged our FIN
    TIME_WAIT_EXPIRED = enum.auto()
    RESET = enum.auto()  # RST received, abort(), or a timer gave up


_S = TcpState
_E = Stimulus

# (state, stimulus) -> next state. RESET is legal everywhere but CLOSED.
_TRANSITIONS: dict[TcpState, dict[Stimulus, TcpState]] = {
    _S.SYN_RECEIVED: {
        _E.ACK_OF_SYN: _S.ESTABLISHED,
        _E.CLOSE: _S.FIN_WAIT_1,
        _E.RESET: _S.CLOSED,
    },
    _S.ESTABLISHED: {
        _E.FIN_RECEIVED: _S.CLOSE_WAIT,
        _E.CLOSE: _S.FIN_WAIT_1,
        _E.RESET: _S.CLOSED,
    },
    _S.FIN_WAIT_1: {
        # A SYN-ACK acknowledged after close(): the FIN was held back and
        # the state already says so; nothing moves.
        _E.ACK_OF_SYN: _S.FIN_WAIT_1,
        _E.ACK_OF_FIN: _S.FIN_WAIT_2,
        _E.FIN_RECEIVED: _S.CLOSING,
        _E.RESET: _S.CLOSED,
    },
    _S.FIN_WAIT_2: {
        _E.FIN_RECEIVED: _S.TIME_WAIT,
        _E.RESET: _S.CLOSED,
    },
    _S.CLOSE_WAIT: {
        _E.CLOSE: _S.LAST_ACK,
        _E.RESET: _S.CLOSED,
    },
    _S.CLOSING: {
        _E.ACK_OF_FIN: _S.TIME_WAIT,
        _E.RESET: _S.CLOSED,
    },
    _S.LAST_ACK: {
        _E.ACK_OF_FIN: _S.CLOSED,
        _E.RESET: _S.CLOSED,
    },
    _S.TIME_WAIT: {
        _E.TIME_WAIT_EXPIRED: _S.CLOSED,
        _E.RESET: _S.CLOSED,
    },
}

# States in which the peer may still send us data (our receive side open).
RECEIVING = frozenset({_S.SYN_RECEIVED, _S.ESTABLISHED, _S.FIN_WAIT_1, _S.FIN_WAIT_2})
# States in which we may still queue data to send (close() not yet called).
SENDING = frozenset({_S.SYN_RECEIVED, _S.ESTABLISHED, _S.CLOSE_WAIT})
# States in which the runtime has nothing left to do with the flow.
FINISHED = frozenset({_S.CLOSED, _S.TIME_WAIT})


def next_state(state: TcpState, stimulus: Stimulus) -> TcpState:
    """Return the state that `stimulus` leads to from `state`.

    Raises:
        LocalProtocolError: the transition is not in the table.
    """
    try:
        return _TRANSITIONS[state][stimulus]
    except KeyError:
        raise LocalProtocolError(f"no transition from {state.value} on {stimulus.name}") from None
