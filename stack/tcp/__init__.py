"""Sans-I/O passive-open TCP: connections, their events, and the demultiplexer.

Segments and time go in, segments and events come out; no trio, no clock,
no randomness (the ISN is an argument). See docs/tcp.md for the API and
the decisions behind it.
"""

from stack.tcp.config import TcpConfig
from stack.tcp.connection import TcpConnection
from stack.tcp.demux import TcpDemux
from stack.tcp.events import (
    NEED_DATA,
    Closed,
    ConnectionRequest,
    ConnectionReset,
    DataReceived,
    DemuxStatistics,
    EofReceived,
    Event,
    FlowKey,
    TcpStatistics,
)
from stack.tcp.state import TcpState

__all__ = [
    "NEED_DATA",
    "Closed",
    "ConnectionRequest",
    "ConnectionReset",
    "DataReceived",
    "DemuxStatistics",
    "EofReceived",
    "Event",
    "FlowKey",
    "TcpConfig",
    "TcpConnection",
    "TcpDemux",
    "TcpState",
    "TcpStatistics",
]
