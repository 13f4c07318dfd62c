"""Hands the C heap's free pages back to the system once tun2sx serves.

Starting up compiles and imports some 200 kB of source and builds the
engine; the temporary objects of that are freed, but glibc keeps the pages
they were on, in the middle of its heap where its automatic trim (top of the
heap only) cannot return them. `malloc_trim(0)` returns every whole free
page (madvise), about 0.8 MiB of an idle tun2sx when the modules compile
from source, less when their bytecode is cached. It is called once, when
the engine serves: the free lists are then at their largest and the
connection-time allocations have not begun. Where the C library has no
`malloc_trim` (musl, Android's bionic) nothing happens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def release_free_pages() -> bool:
    """Return the C heap's free pages to the system; whether the C library could."""
    try:
        # The process's own symbols, the C library's among them (no search
        # for the library's file, which would run ldconfig).
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
