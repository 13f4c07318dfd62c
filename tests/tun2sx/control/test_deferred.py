"""Modules deferred to their first use: not run before it, run once at it, one object throughout."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tun2sx.control import deferred


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A folder on `sys.path` for throwaway modules, removed from `sys.modules` after."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_a_deferred_module_runs_at_its_first_attribute_read_and_stays_one_object(
    modules: Path,
) -> None:
    (modules / "deferred_runs.py").write_text("COUNT = 0\n")
    (modules / "deferred_probe.py").write_text(
        "import deferred_runs\ndeferred_runs.COUNT += 1\nVALUE = 42\n"
    )
    import deferred_runs  # type: ignore[import-not-found]

    deferred.defer(("deferred_probe",))
    import deferred_probe  # type: ignore[import-not-found]

    assert deferred_runs.COUNT == 0  # the import statement alone runs nothing
    placeholder = sys.modules["deferred_probe"]
    assert deferred_probe.VALUE == 42
    assert deferred_runs.COUNT == 1
    assert deferred_probe.VALUE == 42
    assert deferred_runs.COUNT == 1
    assert sys.modules["deferred_probe"] is placeholder is deferred_probe
    assert type(deferred_probe) is type(sys)  # a plain module now


def test_a_module_already_imported_or_not_found_is_left_alone(modules: Path) -> None:
    (modules / "deferred_loaded.py").write_text("VALUE = 1\n")
    import deferred_loaded  # type: ignore[import-not-found]

    deferred.defer(("deferred_loaded", "deferred_missing_module"))
    assert sys.modules["deferred_loaded"] is deferred_loaded
    assert "deferred_missing_module" not in sys.modules


def test_a_module_whose_code_fails_raises_at_first_use_and_can_be_imported_again(
    modules: Path,
) -> None:
    (modules / "deferred_broken.py").write_text("raise ValueError('broken')\n")
    deferred.defer(("deferred_broken",))
    import deferred_broken  # type: ignore[import-not-found]

    with pytest.raises(ValueError, match="broken"):
        _ = deferred_broken.anything
    assert "deferred_broken" not in sys.modules
    (modules / "deferred_broken.py").write_text("VALUE = 2\n")
    import deferred_broken as again

    assert again.VALUE == 2


def test_importing_tun2sx_leaves_openssl_unloaded_until_tls_is_used() -> None:
    script = (
        "import sys, tun2sx, trio\n"
        "print('_ssl' in sys.modules, '_hashlib' in sys.modules)\n"
        "import ssl\n"
        "ssl.create_default_context()\n"
        "import trio._ssl\n"
        "print('_ssl' in sys.modules, trio._ssl._stdlib_ssl is sys.modules['ssl'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "False", "True", "True"]


def test_importing_tun2sx_leaves_idna_and_tempfile_unloaded_until_used() -> None:
    script = (
        "import sys, tun2sx, trio, trio._socket\n"
        "print('idna.core' in sys.modules, type(sys.modules['tempfile']).__name__)\n"
        # What trio's getaddrinfo does with a non-ASCII name.
        "print(trio._socket._idna.encode('bücher.example', uts46=True).decode())\n"
        "import tempfile\n"
        "print(tempfile.gettempprefix())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "_Deferred", "xn--bcher-kva.example", "tmp"]
