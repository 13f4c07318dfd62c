"""Segment headers of one connection: where every outgoing header is built.

`Output` knows the flow's ports and both ISNs (to put positions on the
wire), the negotiated options, and the `rcv.Receiver` whose ACK every
segment carries. It builds the SYN-ACK, the RST the connection queues
(only one can be pending: after it the connection is closed, or it answers
an unacceptable ACK in SYN-RECEIVED), and the header of every other
segment: the sender (`snd.Sender.output`) and the connection's pure ACK
call `header`.

Within one `TcpConnection.segments_to_send` call nothing the options carry
can change (no input arrives in between), so `begin` builds them once (the
timestamp pair and the SACK blocks) and every header of that call shares
that one immutable value. Each header asks the receiver for its window
field, which also records that everything received is acknowledged (a
pending delayed ACK is paid).
"""

from __future__ import annotations

from stack.seq import MASK
from stack.tcp.config import TcpConfig
from stack.tcp.events import FlowKey
from stack.tcp.options import Negotiated, synack_options
from stack.tcp.rcv import Receiver
from stack.wire.tcp import ACK, NO_OPTIONS, RST, SYN, DataRun, TcpHeader, TcpOptions

_tuple_new = tuple.__new__
_SACK_BLOCK_LEN = 8
_SACK_OPTION_BASE = 4  # NOP NOP kind length


class Output:
    """Builds the headers of one connection's segments.

    Attributes:
        sack_len: octets of SACK option the headers of this output carry
            (the sender shortens its payloads by as much, to stay within
            the peer's MSS).
    """

    __slots__ = (
        "_config",
        "_dport",
        "_head",
        "_irs",
        "_iss",
        "_neg",
        "_opts",
        "_rcv",
        "_rst",
        "_runs",
        "_sport",
        "_syn_options",
        "_wscale",
        "sack_len",
    )

    def __init__(
        self,
        key: FlowKey,
        iss: int,
        irs: int,
        neg: Negotiated,
        syn_options: TcpOptions,
        config: TcpConfig,
        rcv: Receiver,
    ) -> None:
        # Our segments go from the remote end to the application.
        self._sport = key.remote_port
        self._dport = key.app_port
        self._iss = iss
        self._irs = irs
        self._neg = neg
        self._wscale = neg.rcv_wscale
        self._syn_options = syn_options
        self._config = config
        self._rcv = rcv
        self._rst: TcpHeader | None = None
        self._opts = NO_OPTIONS
        self._head: tuple[int, int, int] | None = None
        self._runs = False
        self.sack_len = 0

    # ------------------------------------------------------------------ RSTs

    def queue_rst(self, snd_max: int) -> None:
        """Queue the RST that ends the connection (abort, or a timer gave up)."""
        # SND.MAX: the peer has taken everything sent, or the RST lands in
        # its window and draws a challenge ACK at worst (RFC 5961).
        self._rst = TcpHeader(
            self._sport,
            self._dport,
            (self._iss + snd_max) & MASK,
            (self._irs + self._rcv.nxt) & MASK,
            RST | ACK,
            0,
        )

    def queue_rst_for_ack(self, wire_ack: int) -> None:
        """Queue <SEQ=SEG.ACK><RST>: the answer to an unacceptable ACK in SYN-RECEIVED."""
        self._rst = TcpHeader(self._sport, self._dport, wire_ack, 0, RST, 0)

    def take_rst(self) -> TcpHeader | None:
        """Return the queued RST, if any, and forget it."""
        rst = self._rst
        self._rst = None
        return rst

    # --------------------------------------------------------------- headers

    def synack(self, now: float) -> TcpHeader:
        """Return our SYN-ACK, with the options the application's SYN offered."""
        rcv = self._rcv
        tsval = (int(now * 1000) + self._iss) & MASK
        options = synack_options(self._neg, self._syn_options, self._config, tsval, rcv.ts_recent)
        return TcpHeader(
            self._sport,
            self._dport,
            self._iss,
            (self._irs + 1) & MASK,
            SYN | ACK,
            min(0xFFFF, rcv.ack_segment(0)),  # a SYN's window is never scaled
            options=options,
        )

    def begin(self, now: float, runs: bool = False) -> None:
        """Build the options the headers of this output share.

        With `runs`, a run of full segments (`run`) goes out as one
        `DataRun` item instead of a header per segment.
        """
        self._runs = runs
        rcv = self._rcv
        blocks = rcv.wire_sack_blocks()
        if self._neg.timestamps:
            # The ISN doubles as the random timestamp offset (RFC 7323 5.4).
            tsval = (int(now * 1000) + self._iss) & MASK
            # All five fields, without NamedTuple's Python-level __new__.
            self._opts = _tuple_new(TcpOptions, (None, None, False, blocks, (tsval, rcv.ts_recent)))
        elif blocks:
            self._opts = TcpOptions(sack_blocks=blocks)
        else:
            self._opts = NO_OPTIONS
        self.sack_len = _SACK_OPTION_BASE + _SACK_BLOCK_LEN * len(blocks) if blocks else 0
        self._head = None

    def header(self, seq: int, flags: int) -> TcpHeader:
        """Return the header of a segment at send position `seq` (after `begin`).

        The receive side does not move while one output is built, so the
        first header of it pays the owed ACK and fixes the ACK number and
        window field; the others reuse them (`Receiver.ack_segment` again
        would return the same window and change nothing).
        """
        head = self._head
        if head is None:
            rcv = self._rcv
            window = rcv.ack_segment(self._wscale)
            self._head = head = (self._iss, (self._irs + rcv.nxt) & MASK, window)
        iss, ack, window = head
        # tuple.__new__ skips NamedTuple's Python-level __new__ (one per
        # segment sent).
        return _tuple_new(
            TcpHeader,
            (
                self._sport,
                self._dport,
                (iss + seq) & MASK,
                ack,
                flags,
                window,
                0,
                0,
                self._opts,
            ),
        )

    def run(
        self,
        start: int,
        mss: int,
        payloads: list[bytes | memoryview],
        last_flags: int,
        out: list[tuple[TcpHeader | DataRun, bytes | bytearray | memoryview]],
    ) -> None:
        """Append full segments from send position `start`, `mss` octets each.

        Each has ACK, the last `last_flags`; as `header` would give them
        one by one, or as one `DataRun` (see `begin`).
        """
        header = self.header
        if self._runs and len(payloads) > 1:
            out.append((DataRun(header(start, ACK), mss, payloads, last_flags), b""))
            return
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            out.append((header(start + i * mss, last_flags if i == last else ACK), payload))
