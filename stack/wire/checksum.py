"""The Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-header sum.

Every packet in and out of the stack is checksummed, so this is the hottest
byte-level code in tun2sx. A loop over 16-bit words costs about 20 ns per word
in CPython; instead the buffer is read as one big integer and reduced modulo
0xFFFF, which is the one's-complement sum because 2**16 == 1 (mod 0xFFFF):

    int.from_bytes(b0 b1 b2 b3 ...)  ==  sum(word_i * 2**(16*k_i))
                                     ==  sum(word_i)          (mod 0xFFFF)

Measured choices (see docs/performance.md):

* The buffer is read little-endian: CPython converts it a little faster, and a
  trailing odd byte then lands where RFC 1071's zero pad would put it, so odd
  lengths need no copy. The little-endian sum is the byte-swapped big-endian
  sum, and swapping is a rotation by 8 bits, i.e. a multiplication by 2**8
  modulo 0xFFFF (RFC 1071 section 2(B), byte-order independence).
* `%` by a one-digit divisor costs a hardware division per 30-bit digit, the
  dominant cost. Folding first (`(v >> k) + (v & (2**k - 1))` with k a
  multiple of 16, which keeps the value modulo 0xFFFF) halves the digits with
  cheap shifts and adds; k is also a multiple of 30 so the shift moves whole
  digits.
* Large buffers are read in 2880-byte chunks whose integers are summed, then
  folded: about twice as fast as one huge integer for 64 KB.

One's-complement arithmetic has two zeros. The end-around-carry sum of data
that is not all zero is never +0 (0x0000) but -0 (0xFFFF), while the modulo
gives 0 for both; 0xFFFF is restored for a non-zero input.

The C accelerator. All of the above is the fallback: stack/wire/_checksum.c
sums 32-bit words into 64-bit accumulators, 0.03 ns per byte instead of 0.55
and a call's overhead below that of `int.from_bytes` alone. It is built when
tun2sx is installed where a C compiler is, and is used when it imports;
`ones_complement_sum` is then the C function, with exactly the semantics of
`python_ones_complement_sum` (tests/stack/wire/test_checksum_accel.py).
Setting TUN2SX_PURE_PYTHON_CHECKSUM=1 in the environment forces the
fallback; `ACCELERATED` (and `tun2sx --version`) say which one is in use.
"""

from __future__ import annotations

import os
from typing import Final

_fb = int.from_bytes

# Fold points are k = 240 * n bits: a multiple of 16 (keeps the value modulo
# 0xFFFF) and of 30 (CPython's digit size, so shifting moves whole digits).
_MASKS: Final = {k: (1 << k) - 1 for k in range(240, 8 * 2880, 240)}
_M11520: Final = _MASKS[11520]
_M5760: Final = _MASKS[5760]
_M2880: Final = _MASKS[2880]
# Up to _SMALL bytes a single `%` beats folding; above _CHUNK, chunked reads
# win (both measured on the development VM, see docs/performance.md).
_SMALL: Final = 800
_CHUNK: Final = 2880

IPV4_ADDR_LEN: Final = 4
IPV6_ADDR_LEN: Final = 16


# Set to 1 to use the pure-Python sum even where the C one is built.
PURE_PYTHON_ENV: Final = "TUN2SX_PURE_PYTHON_CHECKSUM"


def python_ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Return the folded 16-bit one's-complement sum of `data` plus `initial`.

    The sum is not inverted: add partial sums with `initial` (for instance a
    `pseudo_header_sum`, or the sum of a header followed by its payload when
    the header has an even length) and invert once with `checksum`. A packet
    whose checksum field is right sums to 0xFFFF.

    Args:
        data: bytes of a byte-format buffer; an odd length is padded with a
            zero byte, as RFC 1071 specifies.
        initial: any non-negative integer congruent to a partial sum, folded or
            not.

    Returns:
        The sum in 0..0xFFFF; 0 only when `data` and `initial` are both zero.
    """
    # One function body on purpose: a helper call costs more than the whole
    # sum of an IPv4 header on this interpreter.
    n = len(data)
    if n <= _SMALL:
        w = v = _fb(data, "little")
    elif n <= _CHUNK:
        v = _fb(data, "little")
        k = n // 60 * 240  # half the bits, rounded down to a fold point
        w = (v >> k) + (v & _MASKS[k])
        if n > 1440:
            k = n // 120 * 240
            w = (w >> k) + (w & _MASKS[k])
    else:
        # _CHUNK is even, so every chunk starts on a 16-bit word boundary and
        # the chunk integers add up to the same value modulo 0xFFFF.
        v = 0
        for i in range(0, n, _CHUNK):
            v += _fb(data[i : i + _CHUNK], "little")
        w = (v >> 11520) + (v & _M11520)
        w = (w >> 5760) + (w & _M5760)
        w = (w >> 2880) + (w & _M2880)
    # << 8 swaps the little-endian sum back to network order (mod 0xFFFF).
    r = (((w % 0xFFFF) << 8) + initial) % 0xFFFF
    if r == 0 and (v or initial):
        return 0xFFFF
    return r


ones_complement_sum = python_ones_complement_sum
ACCELERATED = False
if os.environ.get(PURE_PYTHON_ENV, "") in ("", "0"):
    try:
        from stack.wire._checksum import ones_complement_sum as _c_ones_complement_sum
    except ImportError:  # installed without a compiler: the fallback above
        pass
    else:
        ones_complement_sum = _c_ones_complement_sum
        ACCELERATED = True


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Return the Internet checksum of `data`: the inverted one's-complement sum.

    Args:
        data: the bytes covered, with the checksum field itself zeroed.
        initial: a partial sum to include, typically `pseudo_header_sum`.

    Returns:
        The 16-bit value to store in the checksum field (network order).
    """
    return 0xFFFF - ones_complement_sum(data, initial)


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Return the folded sum of the IPv4 or IPv6 pseudo-header.

    The IPv4 pseudo-header (RFC 9293 3.1, RFC 768) is src, dst, zero, proto and
    a 16-bit length; the IPv6 one (RFC 8200 8.1) is src, dst, a 32-bit length,
    three zero bytes and the next header. Both sum to the same words.

    Args:
        src: 4-byte or 16-byte source address.
        dst: destination address of the same family.
        proto: the upper-layer protocol number.
        length: the upper-layer length (header plus data).

    Returns:
        The sum in 1..0xFFFF (or 0 for an all-zero pseudo-header), not
        inverted, ready for `initial` or for a partial checksum field.
    """
    # Addresses and both 16-bit halves of the length are whole words, so the
    # sum can be taken of the integers directly, modulo 0xFFFF.
    total = _fb(src, "big") + _fb(dst, "big") + proto + length
    r = total % 0xFFFF
    if r == 0 and total:
        return 0xFFFF
    return r
