"""The test helpers themselves: a missing server binary skips locally, fails in CI."""

from __future__ import annotations

import pytest

from tests.support import in_ci, require_binary


def test_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_binary("tun2sx-no-such-binary")


def test_missing_binary_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("tun2sx-no-such-binary")


def test_present_binary_is_found() -> None:
    assert require_binary("sh").endswith("/sh")
