"""TcpConfig validation: impossible settings are refused at construction."""

from __future__ import annotations

import pytest

from stack.errors import LocalProtocolError
from stack.tcp import TcpConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mss": 0},
        {"rto_initial": -1.0},
        {"mss": 65496},
        {"gso_size": 65001},
        {"rto_min": 2.0, "rto_max": 1.0},
        {"rcv_buf": (0xFFFF << 14) + 1},
    ],
)
def test_impossible_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        TcpConfig(**kwargs)  # type: ignore[arg-type]


def test_the_largest_scaled_window_is_accepted() -> None:
    assert TcpConfig(rcv_buf=0xFFFF << 14, max_ooo_bytes=1).rcv_buf == 0xFFFF << 14
