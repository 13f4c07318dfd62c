"""The end-to-end bench's pieces that need no lab: sing-box's config, the
failure text of a cell, the column switch. No timing is checked here."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench import e2e, singbox


@pytest.mark.parametrize("stack", singbox.STACKS)
def test_singbox_config_leaves_routing_to_the_lab(stack: str) -> None:
    conf: dict[str, Any] = singbox.config(stack, 1500)
    (tun,) = conf["inbounds"]
    # sing-box must never add routes or rules: the lab's namespace does.
    assert tun["auto_route"] is False
    assert "auto_redirect" not in tun and "strict_route" not in tun
    assert (tun["stack"], tun["mtu"], tun["interface_name"]) == (stack, 1500, "tun0")
    (out,) = conf["outbounds"]
    assert out["type"] == "socks" and out["routing_mark"] == singbox.MARK


def test_failed_cell_text_is_short_and_table_safe() -> None:
    exc = RuntimeError(
        "ip netns exec t2sx-bench-1-abc-client iperf3 -c x | y\n  failed " + "z" * 500
    )
    text = e2e._reason(exc)
    assert text.startswith("iperf3 -c x \\| y failed")
    # The limit counts what the reader sees, not the escapes.
    assert len(text.replace("\\|", "|")) <= 160 and "\n" not in text


def test_only_rejects_unknown_columns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        e2e.main(["--only", "tun2sx,clash"])
    assert "clash" in capsys.readouterr().err
