"""`serve` and the fake-IP table's file: made when missing, one line when it cannot be."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tun2sx.control.app import ConfigError, Settings, serve
from tun2sx.dataplane.tun import TunDevice


def _device() -> tuple[TunDevice, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return TunDevice(ours.detach(), name="fake0", mtu=1500, offload=False), theirs


async def test_the_table_directory_is_made_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "tun2sx" / "fakeip.sqlite"
    device, theirs = _device()
    with theirs:
        settings = Settings(tun_fd=0, fake_ip_db=str(path), stats_interval=0)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve(
                    settings, device=device, handle_signals=False, task_status=task_status
                )
            )
            nursery.cancel_scope.cancel()
    assert path.exists()
    assert (path.parent.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("where", ["under a file", "a directory"])
async def test_a_table_file_that_cannot_be_opened_is_one_line(tmp_path: Path, where: str) -> None:
    if where == "a directory":
        path = tmp_path  # SQLite's own error
    else:
        blocker = tmp_path / "not-a-directory"  # the directory cannot be made
        blocker.write_text("")
        path = blocker / "fakeip.sqlite"
    device, theirs = _device()
    with theirs, pytest.raises(ConfigError) as info:
        await serve(Settings(tun_fd=0, fake_ip_db=str(path)), device=device, handle_signals=False)
    assert str(info.value).startswith(f"fake_ip_db: cannot open {path}: ")
    assert "\n" not in str(info.value)


def test_start_and_reload_warn_once_of_a_missing_interface_as_check_config_does(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Start and reload build their routing with open_routing; check-config
    # must say the same line, and none of them may refuse the file: an
    # uplink such as ppp0 may come up after tun2sx starts.
    from tun2sx.control.app import open_routing
    from tun2sx.control.cli import main

    config = tmp_path / "c.toml"
    config.write_text('outbound = "DIRECT"\ninterface = "nosuch0"\n[tun]\nname = "tun7"\n')
    assert main(["check-config", str(config)]) == 0
    checked = capsys.readouterr().err
    settings = Settings(tun="tun7", outbound="DIRECT", interface="nosuch0")
    with caplog.at_level("WARNING"):
        open_routing(settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "nosuch0" in warnings[0]
    assert checked == warnings[0].replace("tun2sx: ", "tun2sx: warning: ", 1) + "\n"
