"""Wire formats: packet views parsed from untrusted bytes and emitted back.

Every `parse_*_untrusted` function takes a `memoryview`, checks lengths before
reading a field, and raises only `stack.errors.BadPacket`.
"""
