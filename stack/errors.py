"""The stack's error types.

`BadPacket` is the only exception a `parse_*_untrusted` function may raise:
anything else escaping a parser is a bug. `LocalProtocolError` means our own
caller asked for something the protocol does not allow (as in h11);
`RemoteProtocolError` means the peer broke the protocol.
"""


class BadPacket(ValueError):
    """Untrusted bytes that do not form a valid packet or header."""


class LocalProtocolError(RuntimeError):
    """The caller asked the stack for an action the current state forbids."""


class RemoteProtocolError(ValueError):
    """The peer violated the protocol in a way that ends the exchange."""
