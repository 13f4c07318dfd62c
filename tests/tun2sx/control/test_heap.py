"""Start-up's freed C heap goes back to the system once tun2sx serves."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Frees 40 MiB of 4 KiB blocks below a block that stays, so glibc's own trim
# (top of the heap only) cannot return them; prints VmRSS in KiB before and
# after `release_free_pages`.
SCRIPT = """
import re
from tun2sx.control.heap import release_free_pages

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

blocks = [bytearray(4000) for _ in range(10_000)]
pinned = bytearray(4000)
del blocks
before = rss()
released = release_free_pages()
print(released, before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc")
def test_freed_heap_pages_leave_the_resident_set() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    released, before, after = result.stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 20_000  # KiB: most of the 40 MiB freed
