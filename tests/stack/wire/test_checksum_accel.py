"""The C checksum (stack/wire/_checksum.c) against the pure-Python sum it
accelerates, and the wire layer with the fallback forced.

tests/stack/wire/test_checksum.py checks whichever sum is in use against
RFC 1071 and dpkt; here the two implementations must agree on every input,
including the buffer kinds and `initial` values the stack never passes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.wire import checksum
from stack.wire.checksum import PURE_PYTHON_ENV, python_ones_complement_sum
from tests.support import in_ci

ROOT = Path(__file__).resolve().parents[3]

try:
    from stack.wire import _checksum as accel_module
except ImportError:
    accel_module = None


def accel() -> ModuleType:
    """The built accelerator; a skip without it, a failure under CI=true,
    where `./dev test` has just built it and a silent fallback would hide a
    lost compiler or a broken build."""
    if accel_module is None:
        reason = (
            "the C checksum stack.wire._checksum is not built "
            "(no C compiler or Python headers when tun2sx was installed; "
            "`./dev setup` installs them and rebuilds)"
        )
        if in_ci():
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return accel_module


def test_the_accelerator_is_built_and_in_use() -> None:
    module = accel()
    if os.environ.get(PURE_PYTHON_ENV, "") in ("", "0"):
        assert checksum.ACCELERATED
        assert checksum.ones_complement_sum is module.ones_complement_sum


def random_bytes(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


# Small buffers drawn byte by byte (hypothesis shrinks them), large ones up
# to 64 KB from a seed, and the fills where carries and the two zeros matter.
data = st.one_of(
    st.binary(max_size=3000),
    st.builds(random_bytes, st.integers(0, 65536), st.integers(0, 2**32)),
    st.integers(0, 65536).map(lambda n: b"\xff" * n),
    st.integers(0, 3000).map(bytes),
)
initials = st.one_of(
    st.sampled_from([0, 1, 0xFFFE, 0xFFFF, 0x10000, 0x1FFFE, 2**63, 2**64 - 1, 2**64, 2**64 + 1]),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**200),
    st.integers(0, 2**200).map(lambda v: v * 0xFFFF),  # congruent to zero
)


@given(data, initials)
def test_agrees_with_python(buf: bytes, initial: int) -> None:
    c_sum = accel().ones_complement_sum
    assert c_sum(buf, initial) == python_ones_complement_sum(buf, initial)
    assert c_sum(buf) == python_ones_complement_sum(buf)


@given(data, st.integers(0, 7), st.integers(0, 7), st.sampled_from(["bytearray", "ro", "rw"]))
def test_agrees_on_views(buf: bytes, start: int, cut: int, kind: str) -> None:
    # Slices at odd offsets start a buffer off any alignment; a read-only
    # memoryview is what the TUN's received bytes are sliced into.
    c_sum = accel().ones_complement_sum
    end = max(start, len(buf) - cut)
    view: bytearray | memoryview
    if kind == "bytearray":
        view = bytearray(buf[start:end])
    elif kind == "ro":
        view = memoryview(buf)[start:end]
    else:
        view = memoryview(bytearray(buf))[start:end]
    assert (
        c_sum(view)
        == python_ones_complement_sum(view)
        == python_ones_complement_sum(buf[start:end])
    )
    assert c_sum(view, 0xFFFF) == python_ones_complement_sum(view, 0xFFFF)


@given(st.binary(max_size=600), st.integers(1, 5))
def test_agrees_on_strided_views(buf: bytes, step: int) -> None:
    view = memoryview(buf)[::step]
    assert accel().ones_complement_sum(view) == python_ones_complement_sum(view)


@given(st.integers(-(2**100), -1))
def test_agrees_on_negative_initial(initial: int) -> None:
    # Outside the documented range, but Python's `%` defines it: no overflow.
    c_sum = accel().ones_complement_sum
    assert c_sum(b"\x12\x34", initial) == python_ones_complement_sum(b"\x12\x34", initial)


def test_arguments_are_taken_as_the_python_function_takes_them() -> None:
    c_sum = accel().ones_complement_sum
    assert c_sum(data=b"\x00\x01", initial=2) == 3
    assert c_sum(b"\x00\x01", initial=2) == 3
    assert c_sum(b"\x00\x01", True) == 2
    for bad_call in (
        lambda: c_sum(),
        lambda: c_sum(b"", 0, 0),
        lambda: c_sum(b"", 0, initial=1),
        lambda: c_sum(b"", other=1),
        lambda: c_sum(5),
        lambda: c_sum(b"", "1"),
    ):
        with pytest.raises(TypeError):
            bad_call()


def test_the_two_zeros() -> None:
    c_sum = accel().ones_complement_sum
    assert c_sum(b"") == 0
    assert c_sum(bytes(1001)) == 0
    assert c_sum(b"", 0xFFFF) == 0xFFFF
    assert c_sum(b"\xff\xff") == 0xFFFF
    assert c_sum(b"", 2**70 * 0xFFFF) == 0xFFFF
    assert c_sum(b"\x00\x01", 0xFFFE) == 0xFFFF


def run_python(args: list[str], forced: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(PURE_PYTHON_ENV, None)
    if forced:
        env[PURE_PYTHON_ENV] = "1"
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_the_environment_variable_forces_the_fallback() -> None:
    accel()
    show = ["-c", "from stack.wire import checksum as c; print(c.ACCELERATED)"]
    assert run_python(show, forced=True).stdout == "False\n"
    assert run_python(show, forced=False).stdout == "True\n"
    version = ["-c", "from tun2sx.control.cli import main; main(['--version'])"]
    assert run_python(version, forced=True).stdout.endswith(" (checksum: Python)\n")
    assert run_python(version, forced=False).stdout.endswith(" (checksum: C)\n")


def test_the_wire_tests_pass_with_the_fallback() -> None:
    # Every parser and builder of the wire layer, with the sum they get
    # when tun2sx was installed without a compiler.
    # This file compares the C sum with the Python one; it has nothing to
    # say about the fallback alone.
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "tests/stack/wire"]
    result = run_python([*args, "--ignore", str(Path(__file__).relative_to(ROOT))], forced=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
